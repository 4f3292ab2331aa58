//! Channels: a submission ring (consumed by the datapath) and its completion ring (produced by
//! it).

use duplex_ipc::desc::IoDesc;
use duplex_ipc::ring::{Consumer, Producer, WaitPolicy};

/// A submission ring and its completion ring, attached as the datapath's ends.
#[derive(Debug)]
pub struct Channel {
    pub(crate) submit: Consumer<IoDesc>,
    pub(crate) complete: Producer<IoDesc>,
    /// Descriptors address raw drives (by drive id) instead of volumes: the metadata
    /// service's privileged channel.
    pub(crate) raw: bool,
}

impl Channel {
    /// Pairs the attached endpoints of one channel. The engine never uses their blocking waits
    /// (it sleeps in its io_uring, on their doorbells); their policy is set to
    /// [`WaitPolicy::Doorbell`] all the same, so no code path can spin on them.
    pub fn new(mut submit: Consumer<IoDesc>, mut complete: Producer<IoDesc>) -> Self {
        submit.set_policy(WaitPolicy::Doorbell);
        complete.set_policy(WaitPolicy::Doorbell);
        Self {
            submit,
            complete,
            raw: false,
        }
    }

    /// A privileged channel: its descriptors' `volume` is a raw drive id (the engine's device
    /// index of the drive as it was built), reaching the whole drive, superblocks and metadata
    /// areas included, whether or not the drive has become a member of a pool since. Only the
    /// metadata service gets one.
    pub fn raw(submit: Consumer<IoDesc>, complete: Producer<IoDesc>) -> Self {
        Self {
            raw: true,
            ..Self::new(submit, complete)
        }
    }

    /// Id of the submission ring.
    pub fn submit_ring(&self) -> u8 {
        self.submit.ring().ring_id()
    }

    /// Id of the completion ring.
    pub fn complete_ring(&self) -> u8 {
        self.complete.ring().ring_id()
    }
}
