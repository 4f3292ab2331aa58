//! duplex-nvme (being built).
