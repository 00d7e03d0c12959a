//! Gossipsub v1.1 peer scoring, tuned for Weft's topics, and what the
//! network task does with a score: a peer below the graylist threshold is
//! banned (disconnected and refused), not only ignored by gossipsub.
//!
//! Weft's topics are one per conversation: small meshes (the members'
//! devices), quiet for hours, then a burst. Every message is validated by
//! the engine before it is forwarded (`validate_messages`), so an honest
//! peer forwards nothing we would reject, except where two honest nodes
//! disagree for a moment (a membership change seen by one first). The
//! parameters follow from that:
//!
//! - **P4, invalid messages** (weight −10 per topic, counter squared,
//!   decaying by 0.95 a second, a half-life of about 14 s): one or two
//!   rejections cost −10 and −40 and fade; a third within a few seconds
//!   passes the graylist (−90 < −80). A flood is graylisted at once.
//! - **P2, first deliveries** (+1 each, capped at 50, decaying by 0.9 a
//!   second): credit for bringing messages first, so a peer that
//!   delivers a lot of valid traffic can afford an honest rejection.
//! - **P1, time in the mesh** (1/360 per second, capped at 10 points an
//!   hour): a little credit for staying.
//! - **P3, mesh delivery deficit: off.** A conversation may be silent for
//!   hours; a deficit penalty would punish every honest peer in it.
//! - **P6, IP colocation** (−0.19 × (peers − 16)² past 16 peers from one
//!   address, loopback exempt): many peer ids from one address sink
//!   together, below the gossip threshold past 23 and near the publish
//!   threshold at 32, the most one address may hold
//!   (`ConnectionLimits::max_established_per_ip`), but never to the
//!   graylist: that bans, and the devices of a household or office behind
//!   one NAT are no offence. The per-address cap is what stops a crowd;
//!   P6 only keeps it out of our meshes. Loopback is exempt: local
//!   processes share it, and a local attacker has easier ways in.
//! - **P7, behaviour** (−10 × excess², past 6, decaying by 0.9): broken
//!   GRAFT backoffs and unanswered IWANTs.
//! - **Slow peers: off** (gossipsub's default is −0.2 per message
//!   dropped because the peer's send queue was full). A burst to an
//!   honest peer on a slow link could sink it past the graylist and get
//!   it banned for an hour; the network task closes a slow peer's
//!   connections instead (`events`), which frees what waits for it.
//! - Thresholds: gossip −10, publish −50, graylist −80 (gossipsub's
//!   defaults); no peer exchange is used, and opportunistic grafting
//!   needs +5.
//!
//! Anonymous mode stays: the score is of the peer that delivered a
//! message (its propagation source), not of its author, who is unknown to
//! gossipsub.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use libp2p::gossipsub::{PeerScoreParams, PeerScoreThresholds, TopicScoreParams};

/// Below this score a peer's RPCs are ignored by gossipsub, and the
/// network task bans it.
pub(crate) const GRAYLIST: f64 = -80.0;
/// P6: peers from one address past which each costs them all.
const COLOCATION_THRESHOLD: f64 = 16.0;
const COLOCATION_WEIGHT: f64 = -0.19;

pub(super) fn thresholds() -> PeerScoreThresholds {
    PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: GRAYLIST,
        accept_px_threshold: 100.0,
        opportunistic_graft_threshold: 5.0,
    }
}

pub(super) fn params() -> PeerScoreParams {
    PeerScoreParams {
        topic_score_cap: 100.0,
        // The engine's strikes are its own (bans); no application score.
        app_specific_weight: 0.0,
        ip_colocation_factor_weight: COLOCATION_WEIGHT,
        ip_colocation_factor_threshold: COLOCATION_THRESHOLD,
        ip_colocation_factor_whitelist: HashSet::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]),
        behaviour_penalty_weight: -10.0,
        behaviour_penalty_threshold: 6.0,
        behaviour_penalty_decay: 0.9,
        slow_peer_weight: 0.0,
        decay_interval: Duration::from_secs(1),
        decay_to_zero: 0.01,
        // A peer that reconnects finds its score where it left it.
        retain_score: Duration::from_secs(3600),
        ..PeerScoreParams::default()
    }
}

/// The parameters of every conversation topic (set as it is joined).
pub(super) fn topic_params() -> TopicScoreParams {
    TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 1.0 / 360.0,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 50.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.95,
        ..TopicScoreParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameters_are_valid_for_gossipsub() {
        assert_eq!(params().validate(), Ok(()));
        assert_eq!(thresholds().validate(), Ok(()));
        assert_eq!(topic_params().validate(), Ok(()));
    }

    /// Before: −5 × (n − 10)² graylisted (and so banned, address and all)
    /// every peer of an address holding 15 or more, such as the devices
    /// of an office behind one NAT.
    #[test]
    fn a_crowd_behind_one_address_is_never_graylisted_for_that_alone() {
        let cap = f64::from(crate::net::ConnectionLimits::default().max_established_per_ip);
        let p6 = |peers: f64| COLOCATION_WEIGHT * (peers - COLOCATION_THRESHOLD).max(0.0).powi(2);
        assert_eq!(p6(16.0), 0.0, "a household costs nothing");
        assert!(
            p6(cap) > GRAYLIST,
            "the most one address may hold is not banned"
        );
        assert!(
            p6(cap) < thresholds().gossip_threshold,
            "but kept out of gossip"
        );
    }

    #[test]
    fn a_few_rejections_fade_and_three_at_once_graylist() {
        // P4 is weight × counter², the counter decaying each second.
        let p = topic_params();
        let p4 = |count: f64| p.topic_weight * p.invalid_message_deliveries_weight * count * count;
        assert!(p4(2.0) > GRAYLIST, "two honest disagreements are tolerated");
        assert!(p4(3.0) < GRAYLIST, "three at once are not");
        let after_a_minute = 3.0 * p.invalid_message_deliveries_decay.powi(60);
        assert!(p4(after_a_minute) > -1.0, "and they fade within a minute");
    }
}
