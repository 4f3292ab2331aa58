//! duplex-vfio: VFIO transports for duplex's NVMe driver.
//!
//! Two transports. [`kernel`]: a PCIe function bound to `vfio-pci` (container, group and device
//! set up by [`kernel::open`], adopted from fds by [`kernel::Device::from_fds`]). [`user`]: the
//! [vfio-user] protocol, version 0.1: the wire format ([`user::proto`]), a
//! blocking client for the datapath's userspace NVMe driver ([`user::Client`]), the device side
//! that the simulated dual-ported drive serves ([`user::serve`] over a [`user::Device`]), and the
//! server's view of the DMA memory a client shares by fd ([`user::DmaTable`]).
//!
//! Both ends treat their peer as untrusted: every length, index and offset that arrives on the
//! socket is checked before it is used, a malformed message is a typed error (never a panic),
//! and nothing is allocated beyond a fixed bound ([`user::proto::MAX_MESSAGE_SIZE`]) whatever
//! size a peer claims.
//!
//! [vfio-user]: https://github.com/nutanix/libvfio-user/blob/master/docs/vfio-user.rst
#![deny(missing_docs)]

pub mod kernel;
pub mod user;
