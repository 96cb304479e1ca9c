//! HTTP/2 and tunnel settings. The defaults are ztunnel's, so both ends agree on the wire.

use std::time::Duration;

/// Why a [`Settings`] value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The connection window is too small for the stream window.
    #[error(
        "connection window ({connection} bytes) must be at least 4 times the stream window ({stream} bytes): \
         with equal windows one stalled stream stalls the whole connection"
    )]
    ConnectionWindowTooSmall {
        /// Connection window.
        connection: u32,
        /// Stream window.
        stream: u32,
    },
    /// A buffer budget smaller than what one stream holds: no stream could ever move a byte.
    #[error(
        "{budget} ({value} bytes) is smaller than what one stream holds ({lease} bytes: its send buffer \
         plus its largest copy buffer)"
    )]
    BudgetTooSmall {
        /// The budget.
        budget: &'static str,
        /// Its value.
        value: usize,
        /// What one stream holds.
        lease: usize,
    },
    /// A value outside what HTTP/2 allows.
    #[error("{field} = {value} is outside the range HTTP/2 allows ({min}..={max})")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
}

/// Settings of HBONE connections, client and server side: always valid, as
/// [`SettingsBuilder::build`] checks the values against HTTP/2's limits and each other once, and a
/// connection uses them as they are. The default is ztunnel's values.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use meshwire_hbone::Settings;
/// use meshwire_hbone::settings::SettingsError;
///
/// let settings = Settings::builder()
///     .stream_window(1 << 20)
///     .connection_window(4 << 20)
///     .handshake_timeout(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(settings.stream_window(), 1 << 20);
/// assert_eq!(settings.max_frame_size(), Settings::default().max_frame_size());
///
/// // Equal windows would let one stalled stream stall the whole connection.
/// let equal = settings.to_builder().connection_window(1 << 20).build();
/// assert!(matches!(equal, Err(SettingsError::ConnectionWindowTooSmall { .. })));
/// // Errors name the setting.
/// let small = Settings::builder().max_frame_size(1000).build().unwrap_err();
/// assert!(small.to_string().contains("max_frame_size"), "{small}");
/// # Ok::<(), SettingsError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    stream_window: u32,
    connection_window: u32,
    max_frame_size: u32,
    max_concurrent_streams: u32,
    server_max_header_list_size: u32,
    client_max_header_list_size: u32,
    handshake_timeout: Duration,
    read_ahead: usize,
    ping_interval: Duration,
    ping_timeout: Duration,
    send_buffer: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 200,
            server_max_header_list_size: 64 * 1024,
            client_max_header_list_size: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            read_ahead: 256 * 1024,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            send_buffer: 400 * 1024,
        }
    }
}

/// Builds a [`Settings`] value, starting from the defaults ([`Settings::builder`]) or from other
/// settings ([`Settings::to_builder`]); [`build`](Self::build) checks the result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct SettingsBuilder(Settings);

macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty;)*) => {
        impl Settings {
            $($(#[$doc])* pub fn $field(&self) -> $ty {
                self.$field
            })*
        }

        impl SettingsBuilder {
            $(#[doc = concat!("Sets [`Settings::", stringify!($field), "`].")]
            pub fn $field(mut self, value: $ty) -> Self {
                self.0.$field = value;
                self
            })*
        }
    };
}

setters! {
    /// Initial flow-control window of each stream (default 4 MiB).
    stream_window: u32;
    /// Flow-control window of each connection (default 16 MiB; at least 4 times the stream window).
    connection_window: u32;
    /// Largest HTTP/2 frame accepted (default 1 MiB).
    max_frame_size: u32;
    /// Streams a server accepts at once on one connection (default 200).
    max_concurrent_streams: u32;
    /// Largest request header list a server accepts (default 64 KiB).
    server_max_header_list_size: u32;
    /// Largest response header list a client accepts (default 16 KiB).
    client_max_header_list_size: u32;
    /// Time allowed for the TLS and HTTP/2 handshakes (default 10 s).
    handshake_timeout: Duration;
    /// Bytes read from the socket at once under TLS, serving several TLS records per read
    /// (default 256 KiB; 0 reads record by record). The buffer exists only while data is waiting.
    read_ahead: usize;
    /// Interval between keep-alive PINGs of an idle client connection (default 10 s).
    ping_interval: Duration;
    /// Time without a PING answer after which a connection is dropped (default 20 s).
    ping_timeout: Duration;
    /// Bytes HTTP/2 queues for one stream before the socket takes them (default 400 KiB, h2's):
    /// what a stream holds for a peer that does not read, whatever window the peer advertises.
    send_buffer: usize;
}

impl SettingsBuilder {
    /// The settings, once checked against HTTP/2's limits and each other; the error names the
    /// setting that is wrong.
    pub fn build(self) -> Result<Settings, SettingsError> {
        self.0.check()?;
        Ok(self.0)
    }
}

const MAX_WINDOW: u64 = (1 << 31) - 1;
/// The smallest send buffer: one DATA frame of HTTP/2's smallest maximum frame size.
const MIN_SEND_BUFFER: u64 = 16_384;

impl Settings {
    /// A builder starting from the defaults.
    pub fn builder() -> SettingsBuilder {
        SettingsBuilder(Self::default())
    }

    /// A builder starting from these settings.
    pub fn to_builder(&self) -> SettingsBuilder {
        SettingsBuilder(self.clone())
    }

    /// Checks the settings against HTTP/2's limits and each other.
    fn check(&self) -> Result<(), SettingsError> {
        let range = |field, value: u32, min: u64, max: u64| {
            if (min..=max).contains(&u64::from(value)) {
                Ok(())
            } else {
                Err(SettingsError::OutOfRange {
                    field,
                    value: value.into(),
                    min,
                    max,
                })
            }
        };
        range("stream_window", self.stream_window, 1, MAX_WINDOW)?;
        range("connection_window", self.connection_window, 1, MAX_WINDOW)?;
        range("max_frame_size", self.max_frame_size, 16_384, 16_777_215)?;
        range(
            "max_concurrent_streams",
            self.max_concurrent_streams,
            1,
            u32::MAX.into(),
        )?;
        if !(MIN_SEND_BUFFER..=u64::from(u32::MAX)).contains(&(self.send_buffer as u64)) {
            return Err(SettingsError::OutOfRange {
                field: "send_buffer",
                value: self.send_buffer as u64,
                min: MIN_SEND_BUFFER,
                max: u32::MAX.into(),
            });
        }
        if u64::from(self.connection_window) < 4 * u64::from(self.stream_window) {
            return Err(SettingsError::ConnectionWindowTooSmall {
                connection: self.connection_window,
                stream: self.stream_window,
            });
        }
        Ok(())
    }

    /// These settings with other windows, as a [`crate::budget::WindowLease`] allows them (never
    /// more than these, and the stream window at most a quarter of the connection window).
    pub(crate) fn with_windows(&self, connection_window: u32, stream_window: u32) -> Self {
        Self {
            connection_window,
            stream_window,
            ..self.clone()
        }
    }

    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.client_max_header_list_size)
            .max_send_buffer_size(self.send_buffer)
            .enable_push(false);
        b
    }

    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.server_max_header_list_size)
            .max_send_buffer_size(self.send_buffer);
        b
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(Settings::builder().build(), Ok(Settings::default()));
        let equal = Settings::builder().connection_window(4 << 20).build();
        assert!(matches!(equal, Err(SettingsError::ConnectionWindowTooSmall { .. })));
        let err = Settings::builder().max_frame_size(1000).build().unwrap_err();
        assert!(err.to_string().contains("max_frame_size"), "{err}");
        for send_buffer in [0, 1000, 1 << 33] {
            let err = Settings::builder().send_buffer(send_buffer).build().unwrap_err();
            assert!(err.to_string().contains("send_buffer"), "{err}");
        }
    }
}
