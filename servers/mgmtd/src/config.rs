//! mgmtd settings. Defaults follow 3FS: a 60 s lease extended every 10 s,
//! standbys checking every 10 s.

use std::time::Duration;

use r3fs_wire::mgmt::NodeId;

#[derive(Debug, Clone)]
pub struct MgmtdConfig {
    /// This mgmtd's node id; unique among mgmtd instances.
    pub node_id: NodeId,
    /// The address clients reach this mgmtd at (shown to them as the primary).
    pub address: String,
    pub lease_duration: Duration,
    /// How often the primary extends its lease.
    pub extend_interval: Duration,
    /// How often a standby checks whether the lease is free.
    pub check_interval: Duration,
    /// A node not heard from for this long is considered down.
    pub heartbeat_timeout: Duration,
    /// A client session not extended for this long expires.
    pub session_timeout: Duration,
}

impl MgmtdConfig {
    pub fn new(node_id: NodeId, address: impl Into<String>) -> MgmtdConfig {
        MgmtdConfig {
            node_id,
            address: address.into(),
            lease_duration: Duration::from_secs(60),
            extend_interval: Duration::from_secs(10),
            check_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(60),
            session_timeout: Duration::from_secs(300),
        }
    }

    /// Checks the timing rules, naming the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        let margin = crate::lease::STEP_DOWN_MARGIN;
        if self.lease_duration < margin * 4 {
            return Err(format!(
                "lease_duration {:?} must be at least {:?}",
                self.lease_duration,
                margin * 4
            ));
        }
        if self.extend_interval.is_zero() || self.extend_interval * 2 > self.lease_duration {
            return Err(format!(
                "extend_interval {:?} must be positive and at most half of lease_duration {:?}",
                self.extend_interval, self.lease_duration
            ));
        }
        if self.check_interval.is_zero() {
            return Err("check_interval must be positive".into());
        }
        if self.heartbeat_timeout.is_zero() || self.session_timeout.is_zero() {
            return Err("heartbeat_timeout and session_timeout must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_timings_are_named() {
        assert!(MgmtdConfig::new(1, "a").validate().is_ok());
        let mut c = MgmtdConfig::new(1, "a");
        c.extend_interval = Duration::from_secs(40);
        assert!(c.validate().unwrap_err().contains("extend_interval"));
        let mut c = MgmtdConfig::new(1, "a");
        c.lease_duration = Duration::from_millis(100);
        assert!(c.validate().unwrap_err().contains("lease_duration"));
    }
}
