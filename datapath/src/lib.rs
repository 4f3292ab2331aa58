//! duplex-datapath (being built).
