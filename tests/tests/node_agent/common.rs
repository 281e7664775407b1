//! What every node-agent scenario shares: a topology with ready gateways, the inventory file, the agent on
//! node 1, and failure messages that carry the agent's and gateways' logs and the node's kernel state.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tests::agent::{self, AgentConfig, RouteShape};
use tests::topology::POD_RULE_PRIORITY;
use tests::{Inventory, NodeAgent, Pod, Topology, TopologySpec};

/// How long gateways and the agent may take to become ready (start-up on a busy shared machine).
pub(crate) const READY: Duration = Duration::from_secs(30);

/// A running scenario. Field order is drop order: the agent stops before the topology goes.
pub(crate) struct Env {
    pub(crate) agent: NodeAgent,
    pub(crate) inventory: Inventory,
    pub(crate) topo: Topology,
}

impl Env {
    /// Builds `spec`, waits for every gateway, writes the inventory `inventory(&topo)` to
    /// `<dir>/inventory.yaml`, starts the agent on node 1 and waits until it is ready.
    pub(crate) fn start(
        spec: TopologySpec,
        binary: &Path,
        inventory: impl FnOnce(&Topology) -> Inventory,
    ) -> Self {
        Self::start_with(spec, binary, inventory, |_| {})
    }

    /// The common shape: node 1 with `clients.len() + extra_pods` pods, gateway k labelled `codes[k-1]`, policy
    /// `policy` sending 0.0.0.0/0 to the gateways labelled `via`, namespace `app` using it, pod (1, m) being
    /// `app/<clients[m-1]>` (the extra pods are in no inventory yet).
    pub(crate) fn everything_via(
        mode: &tests::GatewayMode,
        binary: &Path,
        codes: &[&str],
        via: &str,
        policy: &str,
        clients: &[&str],
        extra_pods: usize,
    ) -> Self {
        let spec = TopologySpec::node_agent(
            &[clients.len() + extra_pods],
            vec![mode.clone(); codes.len()],
        );
        Self::start(spec, binary, |topo| {
            let mut inv = Inventory::new();
            inv.policy(tests::Policy::new(
                policy,
                vec![tests::PolicyRule::via(ipnet::Ipv4Net::default(), via)],
            ))
            .namespace_with_policy("app", policy);
            for (m, name) in clients.iter().enumerate() {
                inv.client_pod("app", name, topo.pod(1, m + 1));
            }
            for (k, code) in codes.iter().enumerate() {
                inv.gateway_pod(k + 1, code, topo.spec().ipv6);
            }
            inv
        })
    }

    /// [`start`](Self::start), with `before_agent` run on the topology just before the agent starts.
    pub(crate) fn start_with(
        spec: TopologySpec,
        binary: &Path,
        inventory: impl FnOnce(&Topology) -> Inventory,
        before_agent: impl FnOnce(&Topology),
    ) -> Self {
        let mut topo = Topology::build(spec).expect("build the node-agent topology");
        for k in 1..=topo.gateways().len() {
            topo.gateway_mut(k)
                .wait_ready(READY)
                .unwrap_or_else(|e| panic!("gateway {k}: {e}"));
        }
        let inventory = inventory(&topo);
        let path = inventory_path(&topo);
        inventory.write(&path).expect("write the inventory");
        before_agent(&topo);
        let config = AgentConfig::for_node(1, vec![path]);
        let mut agent = NodeAgent::start(&topo, binary, 1, config).expect("start the node agent");
        if let Err(e) = agent.wait_ready(READY) {
            let state = agent::node_state(&topo.node(1).ns);
            panic!("{e}\nnode 1:\n{state}");
        }
        Self {
            agent,
            inventory,
            topo,
        }
    }

    /// Everything that explains a failure: the agent's log tail, every gateway's log tail, node 1's rules,
    /// routes, device, neighbours and FDB.
    pub(crate) fn diag(&self) -> String {
        let mut s = format!(
            "---- node agent log ({}):\n{}\n",
            self.agent.config_path().display(),
            self.agent.log_tail(40)
        );
        for gw in self.topo.gateways() {
            let tail = gw.process().map(|p| p.log_tail(15)).unwrap_or_default();
            s.push_str(&format!("---- gateway {} log:\n{tail}\n", gw.number));
        }
        s.push_str(&format!(
            "---- node 1 kernel state:\n{}",
            agent::node_state(&self.topo.node(1).ns)
        ));
        s
    }

    /// Panics with `what` and [`diag`](Self::diag).
    pub(crate) fn fail(&self, what: impl Display) -> ! {
        panic!("{what}\n{}", self.diag())
    }

    /// Rewrites the inventory file (atomic rename) with `inventory`, keeping it as the current one.
    pub(crate) fn set_inventory(&mut self, inventory: Inventory) {
        self.agent
            .write_inventory(&inventory)
            .unwrap_or_else(|e| self.fail(e));
        self.inventory = inventory;
    }

    /// The agent's table for `pod` (its IPv4 rule at priority 100), waiting up to 5 s for the rule.
    pub(crate) fn table_of(&self, pod: &Pod) -> u32 {
        let node = &self.topo.node(pod.node).ns;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match agent::rule_table(node, IpAddr::V4(pod.ip), POD_RULE_PRIORITY) {
                Ok(Some(t)) => return t,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(None) => self.fail(format!(
                    "no `from {} lookup <table> priority {POD_RULE_PRIORITY}` rule on node {}",
                    pod.ip, pod.node
                )),
                Err(e) => self.fail(e),
            }
        }
    }

    /// Polls (every 20 ms, at most `timeout`) until the route to `dst` in `table` of node 1 is `want`;
    /// returns how long that took.
    pub(crate) fn wait_route(
        &self,
        table: u32,
        dst: impl Into<IpNet>,
        want: &RouteShape,
        timeout: Duration,
    ) -> Duration {
        let dst = dst.into();
        let start = Instant::now();
        let node = &self.topo.node(1).ns;
        let mut last = None;
        loop {
            let now = agent::table_route(node, table, dst).unwrap_or_else(|e| self.fail(e));
            if now.as_ref() == Some(want) {
                return start.elapsed();
            }
            if start.elapsed() >= timeout {
                self.fail(format!(
                    "table {table}, {dst}: want {want:?}, still {now:?} after {timeout:?} (was {last:?})"
                ));
            }
            last = now;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The source address an echo server at `addr` saw from `pod`'s TCP echo (one checked exchange).
    pub(crate) fn tcp_source(&self, pod: &Pod, server: &tests::traffic::Server) -> IpAddr {
        let echo = tests::traffic::tcp_echo(&pod.ns, server.addr(), b"who am I")
            .unwrap_or_else(|e| self.fail(format!("pod {} → {}: {e}", pod.ip, server.addr())));
        assert_eq!(echo, b"who am I");
        server
            .last_peer()
            .map(|p: SocketAddr| p.ip())
            .unwrap_or_else(|| self.fail(format!("{} saw no connection", server.addr())))
    }
}

/// Where the scenario's inventory lives.
pub(crate) fn inventory_path(topo: &Topology) -> PathBuf {
    topo.dir().join("inventory.yaml")
}

/// `Result::unwrap` that fails with the scenario's diagnostics.
pub(crate) trait OrDiag<T> {
    /// The value, or a panic with `what`, the error and [`Env::diag`].
    fn or_diag(self, env: &Env, what: &str) -> T;
}

impl<T, E: Display> OrDiag<T> for Result<T, E> {
    fn or_diag(self, env: &Env, what: &str) -> T {
        self.unwrap_or_else(|e| env.fail(format!("{what}: {e}")))
    }
}

impl<T> OrDiag<T> for Option<T> {
    fn or_diag(self, env: &Env, what: &str) -> T {
        self.unwrap_or_else(|| env.fail(format!("{what}: nothing")))
    }
}
