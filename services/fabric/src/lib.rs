//! duplex-fabric (being built).
