//! Reading and writing the node's kernel state through rtnetlink: being written on branch `kernel`. Until
//! it is merged, the agent refuses to start.
#![allow(dead_code, clippy::unused_async)]
use super::state::{ApplyReport, Desired, Ownership, VxlanSpec};

/// Why the kernel refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KernelError {
    /// Not built yet.
    #[error("netlink programming is not merged yet (branch `kernel`)")]
    Missing,
}

/// The rtnetlink connection.
pub(crate) struct Kernel;

impl Kernel {
    pub(crate) fn connect() -> Result<Self, KernelError> {
        Err(KernelError::Missing)
    }
    pub(crate) async fn ensure_vxlan(&self, _s: &VxlanSpec) -> Result<u32, KernelError> {
        Err(KernelError::Missing)
    }
    pub(crate) async fn apply(
        &self,
        _i: u32,
        _d: &Desired,
        _o: &Ownership,
    ) -> Result<ApplyReport, KernelError> {
        Err(KernelError::Missing)
    }
    pub(crate) async fn cleanup(&self, _o: &Ownership) -> Result<ApplyReport, KernelError> {
        Err(KernelError::Missing)
    }
}

pub(crate) fn set_sysctls(_d: &str) -> Result<(), KernelError> {
    Err(KernelError::Missing)
}
