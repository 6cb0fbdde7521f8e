//! Empty: this package only exists to fetch trtx-sys (see Cargo.toml).
