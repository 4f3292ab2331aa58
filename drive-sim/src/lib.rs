//! duplex-drive-sim: a dual-ported NVMe drive simulator.
