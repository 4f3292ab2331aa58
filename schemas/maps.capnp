# The maps channel: metadata <-> datapath.
#
# One Unix SOCK_SEQPACKET socket pair, created by the supervisor; the datapath gets one end as the
# resource `maps`, the metadata service the other, and the supervisor keeps both, so the channel
# outlives a restart of the metadata service (the datapath's own death stops the node). Holding
# the metadata end is the privilege to decide what the datapath serves: which raw drives form
# which RAID pools, which volumes (extent maps over the pools) the fabric may address, and when
# a member's failure is recorded on disk (releasing the writes held since). Only the metadata
# service holds it; nothing else travels on it (one channel per privilege class), and no file
# descriptors do. Every datagram is exactly one message in the standard (unpacked) Cap'n Proto
# stream framing, at most 64 KiB:
#
#   metadata -> datapath  MapsRequest
#   datapath -> metadata  MapsMessage: a reply (same requestId), or an event at any time
#
# Which reply answers which request: listDevices -> devices; publishPool -> device (the new
# pool's device index); publishVolumes, failuresRecorded, replaceMember -> done. Any request may be answered by
# error instead; nothing is changed when the answer is error. A request the datapath cannot
# decode is answered by error if its requestId could be read, and dropped otherwise.
#
# Epochs: every publication carries the epoch of the map it publishes (the metadata service's
# committed generation). The datapath refuses an epoch older than the one it serves (a restarted
# metadata service replaying an old decision must not roll the maps back) and accepts the same
# epoch again (idempotent replay).
#
# Restarts: the datapath keeps its pools and volumes while the metadata service restarts; a
# successor finds them with listDevices (drives say which pool slot they fill). Events sent while
# no metadata service runs wait in the socket. A restarted datapath comes back with no pools
# and no volumes from this channel: the metadata service publishes them again.
#
# Bounds (both ends enforce them, `duplex_ipc::maps`): names 1..=64 bytes (docs/ONDISK.md),
# error texts at most 4096 bytes, at most 64 members per pool, 256 extents per volume, 4096
# volumes in a volume table, 192 devices in a listing. They are chosen so that the largest
# listing fits one datagram; a volume table that does not is sent in parts (publishVolumes).
#
# Compatibility: as lifecycle.capnp (append only; unknown members and enumerants are rejected).

@0xdb46d7788e9b4c17;

struct MapsRequest {
  requestId @0 :UInt64;
  # Sender-chosen, non-zero, unique per channel for as long as the channel exists (the metadata
  # service starts each of its generations at generation << 32, so a successor never reuses an id
  # whose late reply may still be queued). The reply echoes it.

  body :union {
    listDevices @1 :Void;
    # Every device of the datapath: volumes served 1:1, raw drives (also those taken into a
    # pool), pools.

    publishPool @2 :PoolSpec;
    # Build a RAID device over free raw drives. Publishing the same pool (name) over the same
    # drives again answers the same device (a restarted metadata service replays).

    publishVolumes @3 :PublishVolumes;
    # Replace the volume table.

    failuresRecorded @4 :FailuresRecorded;
    # These members' failure is recorded on disk: release the writes held since.

    startScrub @6 :UInt32;
    # Start scrubbing the parity pool at this device index (answered done once started;
    # listDevices shows the progress and findings).

    retirePool @7 :UInt32;
    # Take the pool device at this index apart (the pool moved to the peer): its rebuilds and
    # scrubs stop, what they have in flight ends, and its members become free raw drives
    # again, answered done then. Refused while a volume maps it or host I/O is in flight.

    replaceMember @5 :ReplaceMember;
    # Put a free raw drive in a failed member's slot of a parity pool, to be rebuilt from
    # `done` on (answered done once swapped; the rebuild runs in the datapath, and
    # listDevices shows the member rebuilding, then active).
  }
}

struct ReplaceMember {
  device @0 :UInt32;
  # The pool's device index.

  slot @1 :UInt32;
  # The failed member's slot.

  drive @2 :UInt32;
  # The free raw drive id that takes it.

  done @3 :UInt64;
  # Bytes of the member's data area already rebuilt (0 for a fresh drive).
}

struct PoolSpec {
  epoch @0 :UInt64;
  # Epoch of the map this pool belongs to.

  name @1 :Text;
  # 1..=64 bytes, for logs and listings (events name a pool by its device index).

  level @2 :RaidLevel;

  chunk @3 :UInt64;
  # Stripe chunk in bytes.

  dataOffset @4 :UInt64;
  # Where the data area starts on each member, in bytes (block aligned).

  dataLen @5 :UInt64;
  # Bytes of each member's data area.

  drives @6 :List(UInt32);
  # The members in slot order, as raw drive ids (datapath device indices of drives); 0xffffffff
  # for a member that is not there (missing or stale, kept out: its state must be failed).
  # 1..=64.

  states @7 :List(MemberState);
  # Each member's recorded state (a failed member stays out): empty (all active) or one per
  # drive.

  holdUntilRecorded @8 :Bool;
  # Hold write and flush completions after a member fails until failuresRecorded names it.

  journalOffset @9 :UInt64;
  journalLen @10 :UInt64;
  # Parity levels: the stripe journal ring on every member (bytes; length 0: no journal).

  journalTag @11 :UInt64;
  # The tag the pool's journal records carry (from the pool UUID).

  rebuildFrom @12 :List(UInt64);
  # Where each rebuilding member resumes its rebuild (member bytes of the data area: the
  # checkpoint on its drives); empty (every rebuild from 0) or one per drive.

  seqBase @13 :UInt64;
  # Mirror levels: the first write sequence number the pool's integrity records get (above
  # every one its drives may hold: the metadata service's committed mark). 0: from 1.

  resync @14 :Bool;
  # Mirror levels: compare the copies of every block before serving its reads, the newest
  # (by sequence) copied over the others (an import after a crash or a power cut).

  bitmapOffset @16 :UInt64;
  bitmapLen @17 :UInt64;
  bitmapTag @18 :UInt64;
  # Mirror levels: the write-intent bitmap area on every member (bytes; length 0: none) and
  # the tag its block carries.

  seqLimit @15 :UInt64;
  # Mirror levels: the pool's committed write sequence mark; no write is numbered at or past
  # it (writes wait until a higher one is published). 0: no limit. A republish of a built
  # device raises it.

  resyncMembers @19 :UInt64;
  # Mirror levels with a bitmap: the rebuilding members (bit = slot) that are members come
  # back stale (kept out since they failed): only the regions the members' write-intent
  # bitmap marks are copied to them; the others are rebuilt whole.
  checksumOffset @20 :UInt64;
  checksumLen @21 :UInt64;
  # The pool's checksum area on every member (bytes from the drive's start; length 0: none):
  # members whose LBA format has no metadata keep their blocks' integrity records there, one
  # 16-byte entry per logical block of the member data area (docs/ONDISK.md, "Checksum area").
}

enum RaidLevel {
  raid0 @0;
  raid1 @1;
  raid10 @2;
  raid5 @3;
  raid6 @4;
}

enum MemberState {
  active @0;
  failed @1;
  rebuilding @2;
}

struct PublishVolumes {
  epoch @0 :UInt64;
  # Epoch of this volume table (the same in every part).

  volumes @1 :List(VolumeMap);
  # This part's volumes. At most 4096 over all parts of a table.

  part @2 :UInt32;
  # Which part of the table this is: 0 starts a new table (discarding any part staged before),
  # then 1, 2, ... in order. A table that fits one datagram is part 0 with more = false.

  more @3 :Bool;
  # More parts follow: the datapath stages this one and answers done. The part with more =
  # false applies the whole table at once (or refuses it whole); a part out of order or of
  # another epoch is refused and the staged parts are dropped.
}

struct VolumeMap {
  id @0 :UInt32;
  # Volume id used in the fabric's descriptors.

  name @1 :Text;
  # 1..=64 bytes.

  blockSize @2 :UInt32;
  # Logical block size in bytes (512 or 4096, the block size of its devices).

  blocks @3 :UInt64;
  # Size in blocks.

  extents @4 :List(Extent);
  # In volume order, covering every block exactly once. 1..=256.
}

struct Extent {
  start @0 :UInt64;
  # First volume block.

  blocks @1 :UInt64;

  device @2 :UInt32;
  # Datapath device index (a pool, or a device served 1:1).

  deviceOffset @3 :UInt64;
  # Byte offset on the device.
}

struct FailuresRecorded {
  device @0 :UInt32;
  # The pool's device index.

  members @1 :List(UInt32);
  # Member slots. 1..=64.
}

struct MapsMessage {
  body :union {
    reply @0 :MapsReply;
    # The answer to one request.

    memberFailed @1 :MemberFailed;
    # A pool member failed (sent when it happens, unasked).
  }
}

struct MapsReply {
  requestId @0 :UInt64;
  # The request answered.

  body :union {
    done @1 :Void;
    # publishVolumes, failuresRecorded: applied.

    device @2 :UInt32;
    # publishPool: the new pool's device index.

    devices @3 :List(DeviceInfo);
    # listDevices: every device, by index. At most 192.

    error @4 :Text;
    # The request was refused or failed; nothing changed. At most 4096 bytes.
  }
}

struct DeviceInfo {
  index @0 :UInt32;
  # Datapath device index (for a drive: its raw drive id).

  name @1 :Text;
  # 1..=64 bytes.

  sizeBytes @2 :UInt64;
  # Usable size (a pool: its data area; a drive: the whole drive).

  blockSize @3 :UInt32;
  # Logical block size in bytes.

  members @4 :List(MemberState);
  # A pool's members' states in slot order; empty for anything else. At most 64.

  inflight @5 :UInt32;
  # I/Os in flight, held ones included (0 for a drive taken into a pool: its pool counts them).

  held @6 :UInt32;
  # Write and flush completions held until a member failure is recorded.

  memberOf :union {
    none @7 :Void;
    # Not taken into a pool.

    pool :group {
      # A drive taken into a pool: which one, in which slot.
      device @8 :UInt32;
      slot @9 :UInt32;
    }
  }

  rebuildSlot @10 :UInt32;
  rebuildDone @11 :UInt64;
  # A parity pool rebuilding a member: its slot and the bytes of its data area rebuilt
  # (0xffffffff: none).

  scrubbed @12 :Bool;
  # A parity pool scrubbed (now or before); then:
  scrubDone @13 :UInt64;
  scrubTotal @14 :UInt64;
  # Bytes of each member's data area checked, of so many (done when equal).
  scrubMismatches @15 :UInt64;
  scrubRepaired @16 :UInt64;
  scrubSkipped @17 :UInt64;
  # Windows whose parity disagreed with the data, rewritten, and not checkable.

  integrityErrors @18 :UInt32;
  # A drive with integrity records (an LBA format with metadata): blocks it returned that
  # failed their check, since the datapath started. 0 otherwise.
  integrityRecovered @19 :UInt32;
  # A pool: reads that found a bad copy and were served from a good one.
  integrityHealed @20 :UInt32;
  # A pool: bad copies rewritten from a good one.
  integrityUnrecoverable @21 :UInt32;
  # A pool: reads with no good copy left (failed to the host with a media error).
  # (32-bit counts, saturating, so that the largest listing stays one datagram.)

  seqHeadroom @22 :UInt32;
  # A mirror pool: write sequence numbers left below its committed mark (writes wait at 0);
  # saturating; 2^32 - 1 for a device without a mark.
  records @23 :Bool;
  # A drive: it keeps integrity records in its LBA format's metadata (8 or more bytes per
  # block). A pool over drives that do not keeps them in a checksum area instead.
}

struct MemberFailed {
  device @0 :UInt32;
  # The pool's device index.

  member @1 :UInt32;
  # The member's slot.

  name @2 :Text;
  # The member device's name (1..=64 bytes).

  status @3 :UInt16;
  # The NVMe status of the I/O that failed (duplex_ipc::desc STATUS_*).
}
