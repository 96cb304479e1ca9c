//! Code shared by the fuzz targets of `fuzz_targets/` (one binary each; see `fuzz/README.md`).
