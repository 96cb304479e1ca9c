//! [`RoundRobin`]: new connections to a listener dealt over the cores' sockets in turn.
//!
//! With `SO_REUSEPORT` alone the kernel picks a core's socket by a hash of the connection's
//! addresses and ports, so a few connections often land on one core: a peer's two pooled tunnels
//! share a core half of the time, and four flows leave one core with three or four of them more
//! often than not. A core that holds more connections than the others is busy while the others
//! idle, and a connection never moves.
//!
//! [`RoundRobin`] attaches a small eBPF program to the listener's reuseport group
//! (`BPF_PROG_TYPE_SK_REUSEPORT`): it increments a counter (which starts at a random value) and
//! selects the socket at `counter % slots` in a socket array (`BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`) where each core put
//! its listening socket. When a slot is empty (a core's socket closed) the kernel's hash picks, as
//! without the program. Loading eBPF needs `CAP_BPF` (or `CAP_SYS_ADMIN`) and a kernel of 5.12 or
//! later (atomic fetch-and-add); without them the proxy keeps the kernel's hash and says so at
//! start.
//!
//! No library loads a hand-written program of a dozen instructions without an ELF object and a
//! BPF toolchain; the `bpf(2)` calls here are the few this needs (`unsafe`: raw system calls on
//! `#[repr(C)]` attribute structures, and taking ownership of the descriptors they return).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

// bpf(2) commands, map and program types, from `include/uapi/linux/bpf.h`.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_ANY: u64 = 0;

// Instruction encoding.
const BPF_LD: u8 = 0x00;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
const BPF_W: u8 = 0x00;
const BPF_DW: u8 = 0x18;
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_ATOMIC: u8 = 0xc0;
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_ADD: u8 = 0x00;
const BPF_MOD: u8 = 0x90;
const BPF_MOV: u8 = 0xb0;
const BPF_JEQ: u8 = 0x10;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
const BPF_FETCH: i32 = 0x01;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const FUNC_SK_SELECT_REUSEPORT: i32 = 82;
const SK_PASS: i32 = 1;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u8,
    /// Destination register in the low nibble, source register in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// `BPF_MAP_CREATE`'s attributes (the leading fields; the kernel reads the rest as zero).
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `BPF_MAP_UPDATE_ELEM`'s attributes.
#[repr(C)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_PROG_LOAD`'s attributes (the leading fields).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `bpf(cmd, attr, size_of(attr))`, returning the new descriptor the command makes.
#[allow(unsafe_code)]
fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: map creation and program loading return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpf(cmd, attr, size_of(attr))`.
#[allow(unsafe_code)]
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid for reads and
    // writes of its size for the duration of the call; every pointer in it points to memory the
    // caller keeps alive across the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(ret).map_err(|_| io::Error::other("bpf(2) returned an out-of-range descriptor"))
}

/// Deals new connections over the sockets of a reuseport group in turn: see the
/// [module](self) documentation.
#[derive(Debug)]
pub struct RoundRobin {
    slots: u32,
    sockets: OwnedFd,
    program: OwnedFd,
    /// Kept open for as long as the program may run (the program holds a reference too).
    _counter: OwnedFd,
}

impl RoundRobin {
    /// A selector for a group of `slots` sockets (one per core), before any has joined.
    pub fn new(slots: u32) -> io::Result<RoundRobin> {
        if slots == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a round robin needs a slot",
            ));
        }
        let counter = bpf_fd(
            BPF_MAP_CREATE,
            &mut MapCreate {
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 4,
                max_entries: 1,
                ..MapCreate::default()
            },
        )
        .map_err(|e| context(e, "creating the counter map"))?;
        // The turn starts at a random slot, so that not every listener of every proxy deals its
        // first connection to the first core.
        map_update(counter.as_fd(), 0, &fastrand::u32(..)).map_err(|e| context(e, "starting the counter"))?;
        let sockets = bpf_fd(
            BPF_MAP_CREATE,
            &mut MapCreate {
                map_type: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
                key_size: 4,
                value_size: 8,
                max_entries: slots,
                ..MapCreate::default()
            },
        )
        .map_err(|e| context(e, "creating the socket array"))?;
        let program = program(counter.as_raw_fd(), sockets.as_raw_fd(), slots);
        let license = c"Apache-2.0";
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"round_robin");
        let program = bpf_fd(
            BPF_PROG_LOAD,
            &mut ProgLoad {
                prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
                insn_cnt: program.len() as u32,
                insns: program.as_ptr() as u64,
                license: license.as_ptr() as u64,
                prog_name: name,
                ..ProgLoad::default()
            },
        )
        .map_err(|e| context(e, "loading the program"))?;
        Ok(RoundRobin {
            slots,
            sockets,
            program,
            _counter: counter,
        })
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Puts `listener` (bound with `SO_REUSEPORT` and listening) in `slot`, and attaches the
    /// program to its reuseport group (again, when another socket of the group did already).
    pub fn join(&self, slot: u32, listener: BorrowedFd<'_>) -> io::Result<()> {
        if slot >= self.slots {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("slot {slot} of a round robin over {}", self.slots),
            ));
        }
        map_update(self.sockets.as_fd(), slot, &(listener.as_raw_fd() as u64))
            .map_err(|e| context(e, "putting the listener in the socket array"))?;
        attach(listener, self.program.as_fd()).map_err(|e| context(e, "attaching the program to the reuseport group"))
    }
}

/// `setsockopt(listener, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, program)`.
#[allow(unsafe_code)]
fn attach(listener: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = program.as_raw_fd();
    // SAFETY: both descriptors are open (borrowed); the option value is a C int that lives across
    // the call, and its size is passed with it.
    let ret = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            std::ptr::from_ref(&fd).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets entry `key` of `map` to `value` (whose size is the map's value size).
fn map_update<V>(map: BorrowedFd<'_>, key: u32, value: &V) -> io::Result<()> {
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &mut MapUpdate {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(value) as u64,
            flags: BPF_ANY,
        },
    )
    .map(drop)
}

fn context(error: io::Error, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

/// The program: `slot = counter++ % slots; bpf_sk_select_reuseport(ctx, sockets, &slot, 0);
/// return SK_PASS` (a failed selection, an empty slot, leaves the pick to the kernel's hash).
fn program(counter: i32, sockets: i32, slots: u32) -> Vec<Insn> {
    let slots = i32::try_from(slots).unwrap_or(i32::MAX);
    vec![
        // r6 = ctx
        insn(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),
        // *(u32 *)(r10 - 4) = 0: the counter's key
        insn(BPF_ST | BPF_MEM | BPF_W, 10, 0, -4, 0),
        // r1 = &counter map
        insn(BPF_LD | BPF_DW | BPF_IMM, 1, BPF_PSEUDO_MAP_FD, 0, counter),
        insn(0, 0, 0, 0, 0),
        // r2 = r10 - 4
        insn(BPF_ALU64 | BPF_MOV | BPF_X, 2, 10, 0, 0),
        insn(BPF_ALU64 | BPF_ADD | BPF_K, 2, 0, 0, -4),
        // r0 = bpf_map_lookup_elem(r1, r2)
        insn(BPF_JMP | BPF_CALL, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM),
        // if r0 == NULL: pass (to the last two instructions)
        insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 11, 0),
        // r1 = 1; r1 = atomic_fetch_add((u32 *)r0, r1)
        insn(BPF_ALU64 | BPF_MOV | BPF_K, 1, 0, 0, 1),
        insn(BPF_STX | BPF_ATOMIC | BPF_W, 0, 1, 0, (BPF_ADD as i32) | BPF_FETCH),
        // w1 %= slots
        insn(BPF_ALU | BPF_MOD | BPF_K, 1, 0, 0, slots),
        // *(u32 *)(r10 - 8) = w1: the socket array's key
        insn(BPF_STX | BPF_MEM | BPF_W, 10, 1, -8, 0),
        // bpf_sk_select_reuseport(ctx, &sockets, r10 - 8, 0)
        insn(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),
        insn(BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, sockets),
        insn(0, 0, 0, 0, 0),
        insn(BPF_ALU64 | BPF_MOV | BPF_X, 3, 10, 0, 0),
        insn(BPF_ALU64 | BPF_ADD | BPF_K, 3, 0, 0, -8),
        insn(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0),
        insn(BPF_JMP | BPF_CALL, 0, 0, 0, FUNC_SK_SELECT_REUSEPORT),
        // return SK_PASS
        insn(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, SK_PASS),
        insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    ]
}
