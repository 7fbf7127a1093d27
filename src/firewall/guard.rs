//! The kill switch's guard: every 2 s it compares the kill switch in the kernel (egress lock,
//! policy routing, nftables table) with what veil wrote and puts back whatever another tool
//! changed, loudly; and it follows the managed users' session cgroups as they log in and out.

use super::Interception;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How often the kill switch is checked.
const EVERY: Duration = Duration::from_secs(2);

/// Guards the kill switch of `i` until `shutdown`.
pub async fn run(mut i: Interception, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let uids = i.routed_uids.clone();
        let slices = tokio::task::spawn_blocking(move || super::user_slices(&uids)).await;
        let changed = slices.as_ref().is_ok_and(|s| *s != i.inbound_cgroups);
        if let (true, Ok(slices)) = (changed, slices) {
            let paths: Vec<&str> = slices.iter().map(|c| c.path.as_str()).collect();
            info!(slices = ?paths, "managed users' session cgroups changed; updating the firewall");
            i.inbound_cgroups = slices;
            let i = i.clone();
            match tokio::task::spawn_blocking(move || super::install(&i)).await {
                Ok(Ok(())) => info!("firewall updated"),
                Ok(Err(e)) => error!(error = %e, "cannot update the firewall"),
                Err(e) => error!(error = %e, "cannot update the firewall"),
            }
            continue;
        }
        let j = i.clone();
        match tokio::task::spawn_blocking(move || super::ensure(&j)).await {
            Ok(Ok(damage)) if damage.is_empty() => {}
            Ok(Ok(damage)) => {
                for d in &damage {
                    error!(damage = %d, "the kill switch was changed by another tool");
                }
                warn!(repaired = damage.len(), "firewall reinstalled");
            }
            Ok(Err(e)) => error!(error = %e, "cannot check or repair the firewall"),
            Err(e) => error!(error = %e, "cannot check or repair the firewall"),
        }
    }
}
