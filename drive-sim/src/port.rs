//! The ports of a simulated drive: each a vfio-user server (one socket) presenting one NVMe over
//! PCIe controller of the shared [`Drive`].
//!
//! Per port, two threads: the *server* thread accepts one client at a time on the port's socket
//! and serves its vfio-user messages ([`duplex_vfio::user::serve`]): register reads and writes
//! go to the [`Controller`] (a doorbell write wakes the worker), `DMA_MAP` adds the client's
//! memory to the port's [`DmaTable`], `SET_IRQS` keeps the MSI-X eventfds; the *worker* thread
//! runs [`Controller::process`] whenever it is woken (doorbell, the drive's [`crate::Waker`]) or
//! a delayed command is due, and signals the interrupt eventfds the controller asks for.
//!
//! A second client connecting while one is served waits in the backlog until the first leaves.
//! When a client leaves, its DMA mappings are dropped and the controller is reset (CC.EN 0),
//! as a PCIe function is when its driver lets go.
//!
//! [`Ports::pull`] makes the ports vanish (listeners and connections closed, socket files
//! removed: a pulled drive); [`Ports::insert`] brings them back.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duplex_nvme::spec::reg;
use duplex_vfio::user::{proto, serve, Device, DeviceInfo, DmaTable, Errno, IrqInfo, RegionInfo};

use crate::ctrl::{Controller, BAR0_SIZE, MAX_IRQ_VECTORS, PCI_VENDOR_ID};
use crate::dma::{Dma, DmaFault};
use crate::drive::Drive;

/// PCI device id the simulator reports (with [`PCI_VENDOR_ID`]).
pub const PCI_DEVICE_ID: u16 = 0x0001;
/// Size of the PCI configuration space region.
const CONFIG_SIZE: u64 = 256;
/// The worker's longest sleep without a wakeup (it also notices stops this way).
const IDLE_WAIT: Duration = Duration::from_millis(100);

use crate::lock;

impl PortShared {
    /// The client's DMA mappings, to change them.
    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, DmaTable> {
        self.dma
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The client's DMA mappings, to reach its memory.
    fn table(&self) -> std::sync::RwLockReadGuard<'_, DmaTable> {
        self.dma
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Wakes a port's worker.
#[derive(Debug, Default)]
struct Kick {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Kick {
    fn wake(&self) {
        *lock(&self.pending) = true;
        self.cv.notify_one();
    }

    /// Waits until woken or `until`; clears the wakeup.
    fn wait(&self, until: Instant) {
        let mut p = lock(&self.pending);
        while !*p {
            let now = Instant::now();
            if now >= until {
                break;
            }
            p = match self.cv.wait_timeout(p, until - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        *p = false;
    }
}

/// What a port's threads share.
struct PortShared {
    name: String,
    ctrl: Mutex<Controller>,
    dma: RwLock<DmaTable>,
    kick: Kick,
    /// MSI-X eventfds by vector.
    irqs: Mutex<Vec<Option<File>>>,
    /// PCI command register and BAR0 address as the client programmed them.
    pci: Mutex<PciState>,
    /// The connection being served, to close it when the drive is pulled.
    conn: Mutex<Option<UnixStream>>,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct PciState {
    command: u16,
    bar0: u64,
}

/// The client's memory, as the controller reads and writes it.
struct TableDma<'a>(&'a DmaTable);

impl Dma for TableDma<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.0.read(addr, buf).map_err(|_| DmaFault {
            addr,
            len: buf.len() as u64,
        })
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.0.write(addr, data).map_err(|_| DmaFault {
            addr,
            len: data.len() as u64,
        })
    }
}

/// The vfio-user device of one port.
struct PortDevice(Arc<PortShared>);

impl PortDevice {
    fn config_read(&self, offset: u64, buf: &mut [u8]) {
        let pci = lock(&self.0.pci);
        let mut space = [0u8; CONFIG_SIZE as usize];
        space[0..2].copy_from_slice(&PCI_VENDOR_ID.to_le_bytes());
        space[2..4].copy_from_slice(&PCI_DEVICE_ID.to_le_bytes());
        space[4..6].copy_from_slice(&pci.command.to_le_bytes());
        space[8] = 0; // revision
        space[9] = 0x02; // programming interface: NVM Express
        space[10] = 0x08; // subclass: non-volatile memory controller
        space[11] = 0x01; // class: mass storage
        space[14] = 0; // header type 0
                       // BAR0: 64-bit memory BAR (bits 2:1 = 10b), not prefetchable; reads back the size
                       // mask after all-ones was written (BAR sizing).
        let bar = (pci.bar0 & !(BAR0_SIZE - 1)) | 0b100;
        space[16..24].copy_from_slice(&bar.to_le_bytes());
        space[44..46].copy_from_slice(&PCI_VENDOR_ID.to_le_bytes());
        space[46..48].copy_from_slice(&PCI_DEVICE_ID.to_le_bytes());
        let from = offset as usize;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = space.get(from + i).copied().unwrap_or(0);
        }
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        let mut pci = lock(&self.0.pci);
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i as u64;
            match at {
                4 | 5 => {
                    let mut c = pci.command.to_le_bytes();
                    c[(at - 4) as usize] = b;
                    pci.command = u16::from_le_bytes(c);
                }
                16..=23 => {
                    let mut a = pci.bar0.to_le_bytes();
                    a[(at - 16) as usize] = b;
                    pci.bar0 = u64::from_le_bytes(a);
                }
                // Everything else is read-only here.
                _ => {}
            }
        }
    }
}

impl Device for PortDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET,
            num_regions: proto::PCI_NUM_REGIONS,
            num_irqs: proto::PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE;
        let (size, flags) = match index {
            proto::PCI_BAR0_REGION_INDEX => (BAR0_SIZE, rw),
            proto::PCI_CONFIG_REGION_INDEX => (CONFIG_SIZE, rw),
            i if i < proto::PCI_NUM_REGIONS => (0, 0),
            _ => return None,
        };
        Some(RegionInfo {
            index,
            flags,
            size,
            ..RegionInfo::default()
        })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let count = match index {
            proto::PCI_MSIX_IRQ_INDEX => u32::from(MAX_IRQ_VECTORS),
            i if i < proto::PCI_NUM_IRQS => 0,
            _ => return None,
        };
        Some(IrqInfo {
            index,
            flags: if count > 0 {
                proto::IRQ_INFO_EVENTFD | proto::IRQ_INFO_NORESIZE
            } else {
                0
            },
            count,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        match index {
            proto::PCI_BAR0_REGION_INDEX => lock(&self.0.ctrl)
                .read_reg(offset, buf)
                .map_err(|_| Errno::EINVAL),
            proto::PCI_CONFIG_REGION_INDEX => {
                self.config_read(offset, buf);
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            proto::PCI_BAR0_REGION_INDEX => {
                let r = lock(&self.0.ctrl)
                    .write_reg(offset, data)
                    .map_err(|_| Errno::EINVAL);
                // Doorbells and CC changes create work.
                if offset >= reg::DOORBELLS || offset == reg::CC {
                    self.0.kick.wake();
                }
                r
            }
            proto::PCI_CONFIG_REGION_INDEX => {
                self.config_write(offset, data);
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        file_offset: u64,
        readable: bool,
        writable: bool,
        fd: Option<OwnedFd>,
    ) -> Result<(), Errno> {
        let fd = fd.ok_or(Errno::EINVAL)?;
        self.0
            .table_mut()
            .map(iova, size, file_offset, readable, writable, fd)
            .map_err(|e| e.errno())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), Errno> {
        self.0.table_mut().unmap(iova, size).map_err(|e| e.errno())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Errno> {
        if index != proto::PCI_MSIX_IRQ_INDEX {
            return Err(Errno::EINVAL);
        }
        let mut irqs = lock(&self.0.irqs);
        let end = start.checked_add(count).ok_or(Errno::EINVAL)?;
        if end > u32::from(MAX_IRQ_VECTORS) {
            return Err(Errno::EINVAL);
        }
        if irqs.len() < end as usize {
            irqs.resize_with(end as usize, || None);
        }
        if flags & proto::IRQ_SET_DATA_EVENTFD != 0 && flags & proto::IRQ_SET_ACTION_TRIGGER != 0 {
            if fds.len() != count as usize {
                return Err(Errno::EINVAL);
            }
            for (i, fd) in fds.into_iter().enumerate() {
                irqs[start as usize + i] = Some(File::from(fd));
            }
        } else if flags & proto::IRQ_SET_DATA_NONE != 0 {
            for slot in irqs.iter_mut().skip(start as usize).take(count as usize) {
                *slot = None;
            }
        } else {
            return Err(Errno::ENOTSUP);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        let mut c = lock(&self.0.ctrl);
        c.write_reg(reg::CC, &0u32.to_le_bytes())
            .map_err(|_| Errno::EIO)?;
        lock(&self.0.irqs).clear();
        Ok(())
    }
}

/// One port: its shared state, socket path, threads.
struct Port {
    shared: Arc<PortShared>,
    path: PathBuf,
    server: Option<(OwnedFd, JoinHandle<()>)>,
    worker: Option<JoinHandle<()>>,
}

impl Port {
    /// Binds the socket and serves it (a thread accepting one client at a time).
    fn serve(&mut self) -> std::io::Result<()> {
        let listener = UnixListener::bind(&self.path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        let fd = OwnedFd::from(listener.try_clone()?);
        let s = self.shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("port-{}", self.path.display()))
            .spawn(move || accept_loop(&s, &listener))?;
        self.server = Some((fd, h));
        Ok(())
    }

    /// Stops accepting, closes the connection, removes the socket file.
    fn unplug(&mut self) {
        if let Some((fd, h)) = self.server.take() {
            // Wakes the accept() (EINVAL) so the thread ends.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                nix::sys::socket::Shutdown::Both,
            );
            if let Some(c) = lock(&self.shared.conn).as_ref() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The ports of a drive.
pub struct Ports {
    drive: Arc<Drive>,
    ports: Vec<Port>,
    present: bool,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports")
            .field("sockets", &self.sockets())
            .field("present", &self.present)
            .finish()
    }
}

impl Ports {
    /// Starts one port per socket path (controller ids 1, 2, ...), listening at once. A path
    /// that exists is refused (another drive may be serving there).
    pub fn start(drive: Arc<Drive>, sockets: &[PathBuf]) -> std::io::Result<Ports> {
        let mut ports = Vec::new();
        for (i, path) in sockets.iter().enumerate() {
            let cntlid = u16::try_from(i + 1).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many ports")
            })?;
            let shared = Arc::new(PortShared {
                name: path.display().to_string(),
                ctrl: Mutex::new(Controller::new(drive.clone(), cntlid)),
                dma: RwLock::new(DmaTable::new()),
                kick: Kick::default(),
                irqs: Mutex::new(Vec::new()),
                pci: Mutex::new(PciState::default()),
                conn: Mutex::new(None),
                stop: AtomicBool::new(false),
            });
            let w = shared.clone();
            drive.set_waker(cntlid, Some(Arc::new(move || w.kick.wake())));
            let w = shared.clone();
            let worker = std::thread::Builder::new()
                .name(format!("port{cntlid}-worker"))
                .spawn(move || work(&w))?;
            ports.push(Port {
                shared,
                path: path.clone(),
                server: None,
                worker: Some(worker),
            });
        }
        let mut p = Ports {
            drive,
            ports,
            present: false,
        };
        p.insert()?;
        Ok(p)
    }

    /// The drive behind the ports.
    pub fn drive(&self) -> &Arc<Drive> {
        &self.drive
    }

    /// The socket paths.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.ports.iter().map(|p| p.path.clone()).collect()
    }

    /// Whether the ports are there (not pulled).
    pub fn present(&self) -> bool {
        self.present
    }

    /// Binds the sockets and serves them again (after [`Ports::pull`]); a no-op when present.
    pub fn insert(&mut self) -> std::io::Result<()> {
        if self.present {
            return Ok(());
        }
        for p in &mut self.ports {
            p.serve()?;
        }
        self.drive.set_present(true);
        self.present = true;
        tracing::info!(sockets = ?self.sockets(), "drive ports present");
        Ok(())
    }

    /// Makes the ports vanish: stops accepting, closes the connections, removes the socket
    /// files. Controllers see their client leave (reset); the drive's data stays.
    pub fn pull(&mut self) {
        if !self.present {
            return;
        }
        self.drive.set_present(false);
        for p in &mut self.ports {
            p.unplug();
        }
        self.present = false;
        tracing::info!("drive ports pulled");
    }

    /// Pulls the cable of port `i` alone (counting from 0): its socket vanishes and its
    /// controller's client is gone; the drive and its other port go on. A no-op when that port
    /// is already unplugged.
    pub fn pull_port(&mut self, i: usize) -> Result<(), String> {
        let n = self.ports.len();
        let p = self
            .ports
            .get_mut(i)
            .ok_or_else(|| format!("no port {i}: the drive has ports 0..{n}"))?;
        p.unplug();
        tracing::info!(port = i, socket = %p.path.display(), "port pulled");
        Ok(())
    }

    /// Plugs port `i` back in (after [`Ports::pull_port`]); a no-op when it is plugged in or
    /// the whole drive is pulled (inserting the drive plugs every port).
    pub fn insert_port(&mut self, i: usize) -> Result<(), String> {
        let n = self.ports.len();
        let present = self.present;
        let p = self
            .ports
            .get_mut(i)
            .ok_or_else(|| format!("no port {i}: the drive has ports 0..{n}"))?;
        if present && p.server.is_none() {
            p.serve().map_err(|e| e.to_string())?;
            tracing::info!(port = i, socket = %p.path.display(), "port inserted");
        }
        Ok(())
    }

    /// Whether each port is plugged in (its socket served).
    pub fn ports_present(&self) -> Vec<bool> {
        self.ports.iter().map(|p| p.server.is_some()).collect()
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        self.pull();
        for p in &mut self.ports {
            p.shared.stop.store(true, Ordering::Relaxed);
            p.shared.kick.wake();
            if let Some(h) = p.worker.take() {
                let _ = h.join();
            }
            self.drive.set_waker(p.shared.ctrl_id(), None);
        }
    }
}

impl PortShared {
    fn ctrl_id(&self) -> u16 {
        lock(&self.ctrl).cntlid()
    }
}

fn accept_loop(s: &Arc<PortShared>, listener: &UnixListener) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Shut down by `pull` (EINVAL), or the listener failed: either way this port
                // stops serving.
                tracing::debug!(port = %s.name, error = %e, "port stops accepting");
                return;
            }
        };
        match stream.try_clone() {
            Ok(c) => *lock(&s.conn) = Some(c),
            Err(e) => {
                tracing::warn!(port = %s.name, error = %e, "cannot keep a handle on the connection");
            }
        }
        tracing::info!(port = %s.name, "client connected");
        let mut dev = PortDevice(s.clone());
        match serve(stream, &mut dev) {
            Ok(()) => tracing::info!(port = %s.name, "client left"),
            Err(e) => tracing::warn!(port = %s.name, error = %e, "client connection ended"),
        }
        *lock(&s.conn) = None;
        // The client's memory is gone with it: reset the controller, drop its mappings.
        {
            let mut c = lock(&s.ctrl);
            let _ = c.write_reg(reg::CC, &0u32.to_le_bytes());
        }
        s.table_mut().clear();
        lock(&s.irqs).clear();
    }
}

fn work(s: &Arc<PortShared>) {
    while !s.stop.load(Ordering::Relaxed) {
        let progress = {
            let dma = s.table();
            let mut c = lock(&s.ctrl);
            c.process(&TableDma(&dma), Instant::now())
        };
        if progress.irqs != 0 {
            let mut irqs = lock(&s.irqs);
            for (v, fd) in irqs.iter_mut().enumerate().take(64) {
                if progress.irqs & (1 << v) != 0 {
                    if let Some(f) = fd {
                        let _ = f.write_all(&1u64.to_ne_bytes());
                    }
                }
            }
        }
        if progress.worked {
            continue;
        }
        let until = progress
            .next_due
            .unwrap_or_else(|| Instant::now() + IDLE_WAIT)
            .min(Instant::now() + IDLE_WAIT);
        s.kick.wait(until);
    }
}
