//! Channels: a submission ring (consumed by the datapath) and its completion ring (produced by
//! it).

use duplex_ipc::desc::IoDesc;
use duplex_ipc::ring::{Consumer, Producer, WaitPolicy};

/// A submission ring and its completion ring, attached as the datapath's ends.
#[derive(Debug)]
pub struct Channel {
    pub(crate) submit: Consumer<IoDesc>,
    pub(crate) complete: Producer<IoDesc>,
}

impl Channel {
    /// Pairs the attached endpoints of one channel. The engine never uses their blocking waits
    /// (it sleeps in its io_uring, on their doorbells); their policy is set to
    /// [`WaitPolicy::Doorbell`] all the same, so no code path can spin on them.
    pub fn new(mut submit: Consumer<IoDesc>, mut complete: Producer<IoDesc>) -> Self {
        submit.set_policy(WaitPolicy::Doorbell);
        complete.set_policy(WaitPolicy::Doorbell);
        Self { submit, complete }
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
