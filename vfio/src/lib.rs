//! duplex-vfio: VFIO transports for duplex's NVMe driver.
