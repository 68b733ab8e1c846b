//! Data parallelism: `N` ranks hold the same weights, each takes its shard of every optimizer
//! step's samples, and the gradients are summed over the ranks (burn-collective's all-reduce)
//! before the one update every rank applies. Ranks are threads of this process, one per device
//! (a GPU on CUDA, a CPU worker on ndarray / flex); with `nodes > 1`, one process per node.
//!
//! - **Recipe** (`[parallel]`, both learners): `devices` (a count, or the device ids this node
//!   drives), `nodes`, `node_rank`, `coordinator = "host:port"` (multi-node only).
//! - **Exactness**: a step's loss is a sum of per-token terms over a denominator of the whole
//!   step (all ranks), so each rank scales its share by the all-reduced denominator and the summed
//!   gradients are those of one rank taking the whole step; the global grad-norm clip then sees
//!   the same gradients everywhere and every rank takes the same AdamW step.
//! - **No hang on mixed batches**: the ranks first agree on which trainable parameters any of
//!   them has a gradient for; those are all-reduced in the module's order, with zeros where a
//!   rank's micro-batches gave it none (a rank with text only while another saw an image, or a
//!   rank with no sample at an epoch's end); the others stay without a gradient, as on one rank.
//! - **Faults**: a rank that fails stops the collective ([`burn_collective::reset_collective`]),
//!   so the others' pending all-reduce fails at once instead of waiting; the run's error names the
//!   rank that failed first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::{AutodiffBackend, DeviceId};
use burn::tensor::TensorPrimitive;
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, CollectiveError, GlobalCollectiveError, PeerId,
    ReduceOperation,
};
use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::generate::Generation;

/// `[parallel]` of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Devices this node drives: a count (`4`: devices 0-3, or 4 CPU workers) or the ids of
    /// its GPUs (`[4, 5, 6, 7]`).
    #[serde(default)]
    pub devices: Devices,
    /// Nodes of the run (one `infimed` process each).
    #[serde(default = "one")]
    pub nodes: usize,
    /// This node's index, `0..nodes`.
    #[serde(default)]
    pub node_rank: usize,
    /// `host:port` of node 0, which every node reaches (multi-node only). Node 0 serves the
    /// rendezvous there; node `k` serves its tensors on `port + 1 + k`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// The host (name or IP) at which the other nodes reach this one (multi-node only; default:
    /// the address of this machine's interface towards the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_address: Option<String>,
}

/// `parallel.devices`: how many, or which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Devices {
    Count(usize),
    Ids(Vec<usize>),
}

impl Default for Devices {
    fn default() -> Self {
        Devices::Count(1)
    }
}

fn one() -> usize {
    1
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            devices: Devices::default(),
            nodes: 1,
            node_rank: 0,
            coordinator: None,
            node_address: None,
        }
    }
}

impl ParallelConfig {
    /// Devices (ranks) on this node.
    pub fn local_ranks(&self) -> usize {
        match &self.devices {
            Devices::Count(n) => *n,
            Devices::Ids(ids) => ids.len(),
        }
    }

    /// Ranks over all nodes (every node drives the same number of devices).
    pub fn world_size(&self) -> usize {
        self.local_ranks() * self.nodes
    }

    /// The device index of local rank `i` (`device` is the recipe's `device`, the first one
    /// when `devices` is a count).
    pub fn device_index(&self, first: usize, i: usize) -> usize {
        match &self.devices {
            Devices::Count(_) => first + i,
            Devices::Ids(ids) => ids[i],
        }
    }

    pub fn check(&self, errors: &mut Vec<String>) {
        match &self.devices {
            Devices::Count(0) => errors.push("parallel.devices must be >= 1".into()),
            Devices::Ids(ids) if ids.is_empty() => {
                errors.push("parallel.devices must list at least one device id".into())
            }
            Devices::Ids(ids) => {
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != ids.len() {
                    errors.push(format!("parallel.devices lists a device twice: {ids:?}"));
                }
            }
            _ => {}
        }
        if self.nodes == 0 {
            errors.push("parallel.nodes must be >= 1".into());
        }
        if self.node_rank >= self.nodes.max(1) {
            errors.push(format!(
                "parallel.node_rank must be in 0..{} (parallel.nodes), got {}",
                self.nodes, self.node_rank
            ));
        }
        if self.nodes > 1 {
            match &self.coordinator {
                None => errors.push("parallel.nodes > 1 needs parallel.coordinator = \"host:port\" (node 0's address)".into()),
                Some(c) => match parse_host_port(c) {
                    None => errors.push(format!("parallel.coordinator must be \"host:port\", got \"{c}\"")),
                    Some((_, port)) if port as usize + self.nodes > u16::MAX as usize => {
                        errors.push(format!("parallel.coordinator: port {port} leaves no room for the nodes' ports (port + 1 + node_rank)"))
                    }
                    _ => {}
                },
            }
            if let Some(a) = &self.node_address {
                if a.is_empty() || a.contains('/') || parse_host_port(a).is_some() {
                    errors.push(format!("parallel.node_address must be a host name or IP without a port, got \"{a}\""));
                }
            }
        }
    }
}

/// `host:port` split; `None` when it is not of that form.
pub fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// One rank of a run: where it is in the world, and its all-reduce.
#[derive(Clone)]
pub struct Rank {
    /// Global rank, `0..world`.
    pub rank: usize,
    pub world: usize,
    /// Set when another rank of this process failed: stop at the next collective call.
    aborted: Arc<AtomicBool>,
    /// Where the nodes serve their tensors (multi-node runs): to name a lost one's ranks.
    nodes: Option<NodePorts>,
}

/// Node `k` of a multi-node run serves its tensors on `base + 1 + k` (`base`: the coordinator's
/// port) and drives `local` ranks.
#[derive(Clone, Copy, Debug)]
struct NodePorts {
    base: u16,
    local: usize,
}

impl NodePorts {
    fn data_port(&self, node: usize) -> u16 {
        self.base + 1 + node as u16
    }

    /// "node 1 (ranks 2-3)" for the addresses a collective reported lost.
    fn describe(&self, addresses: &str) -> String {
        let nodes: Vec<String> = addresses
            .split(", ")
            .map(|a| {
                let port = a
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
                match port.filter(|&p| p > self.base) {
                    Some(p) => {
                        let k = (p - self.base - 1) as usize;
                        format!(
                            "node {k} (ranks {}-{}) at {a}",
                            k * self.local,
                            (k + 1) * self.local - 1
                        )
                    }
                    None => format!("the node at {a}"),
                }
            })
            .collect();
        nodes.join(", ")
    }
}

impl Rank {
    /// The only rank of a run without data parallelism.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            aborted: Arc::new(AtomicBool::new(false)),
            nodes: None,
        }
    }

    /// Rank 0 logs, writes metrics, checkpoints and the export.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn peer(&self) -> PeerId {
        PeerId(self.rank as u32)
    }

    fn check_alive(&self) -> Result<()> {
        if self.aborted.load(Ordering::SeqCst) {
            bail!("rank {}: stopping, another rank failed", self.rank);
        }
        Ok(())
    }

    /// Sum of a tensor over the ranks (itself on a single rank).
    pub fn all_reduce_sum<B: Backend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
    ) -> Result<Tensor<B, D>> {
        if self.world == 1 {
            return Ok(tensor);
        }
        self.check_alive()?;
        let out = burn_collective::all_reduce::<B>(
            self.peer(),
            tensor.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| self.collective_error(e))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// A failed all-reduce, naming the node (and its ranks) that was lost where that is the cause.
    fn collective_error(&self, e: CollectiveError) -> anyhow::Error {
        match (&e, &self.nodes) {
            (CollectiveError::Global(GlobalCollectiveError::PeerLostAt(at)), Some(nodes)) => {
                anyhow!(
                "rank {}: all-reduce failed: lost {}: its process ended or its connection dropped",
                self.rank,
                nodes.describe(at)
            )
            }
            _ => anyhow!("rank {}: all-reduce failed: {e:?}", self.rank),
        }
    }

    /// Sums of a few numbers over the ranks (counts and metrics; f32 on the device: integers are
    /// exact up to 2^24).
    pub fn sum_values<B: Backend>(&self, values: &[f64], device: &B::Device) -> Result<Vec<f64>> {
        if self.world == 1 {
            return Ok(values.to_vec());
        }
        let t = Tensor::<B, 1>::from_floats(
            values
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>()
                .as_slice(),
            device,
        );
        let out = self.all_reduce_sum(t)?.into_data().convert::<f32>();
        Ok(out
            .as_slice::<f32>()
            .map_err(|e| anyhow!("{e:?}"))?
            .iter()
            .map(|&v| v as f64)
            .collect())
    }

    /// `module` with every parameter set to rank 0's values, as DDP starts: ranks that
    /// initialised or loaded their weights on their own (random initialisation draws from one
    /// RNG per process, in whatever order the rank threads reach it) then start alike.
    /// Trainable stays trainable, frozen stays frozen; the ids are kept.
    pub fn sync_from_main<B: AutodiffBackend, M: Module<B>>(&self, module: M) -> Result<M> {
        if self.world == 1 {
            return Ok(module);
        }
        struct SyncFromMain<'a> {
            rank: &'a Rank,
            error: Option<anyhow::Error>,
        }
        impl<B: AutodiffBackend> ModuleMapper<B> for SyncFromMain<'_> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                if self.error.is_some() {
                    return param;
                }
                let (rank, error) = (self.rank, &mut self.error);
                param.map(|t| {
                    let require_grad = t.is_require_grad();
                    let inner = t.inner();
                    let out = match rank.main_values(inner.clone()) {
                        Ok(v) => v,
                        Err(e) => {
                            *error = Some(e);
                            inner
                        }
                    };
                    let out = Tensor::from_inner(out);
                    if require_grad {
                        out.require_grad()
                    } else {
                        out
                    }
                })
            }
        }
        let mut m = SyncFromMain {
            rank: self,
            error: None,
        };
        let module = module.map(&mut m);
        m.error.map_or(Ok(module), Err)
    }

    /// [`Rank::sync_from_main`] for a module without autodiff (GRPO's frozen reference).
    pub fn sync_inner_from_main<B: Backend, M: Module<B>>(&self, module: M) -> Result<M> {
        if self.world == 1 {
            return Ok(module);
        }
        struct SyncFromMain<'a> {
            rank: &'a Rank,
            error: Option<anyhow::Error>,
        }
        impl<B: Backend> ModuleMapper<B> for SyncFromMain<'_> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                if self.error.is_some() {
                    return param;
                }
                let (rank, error) = (self.rank, &mut self.error);
                param.map(|t| match rank.main_values(t.clone()) {
                    Ok(v) => v,
                    Err(e) => {
                        *error = Some(e);
                        t
                    }
                })
            }
        }
        let mut m = SyncFromMain {
            rank: self,
            error: None,
        };
        let module = module.map(&mut m);
        m.error.map_or(Ok(module), Err)
    }

    /// Rank 0's `tensor` on every rank (an all-reduce of it and the others' zeros: exact).
    fn main_values<B: Backend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
    ) -> Result<Tensor<B, D>> {
        let mine = if self.is_main() {
            tensor
        } else {
            tensor.zeros_like()
        };
        self.all_reduce_sum(mine)
    }

    /// Every rank's generations, in order: this rank holds those of indices
    /// `start..start + local.len()` of `total`; the others' arrive by two all-reduces (lengths
    /// and stop flags, then the token ids as f32, exact below 2^24).
    pub fn all_gather_generations<B: Backend>(
        &self,
        local: Vec<Generation>,
        start: usize,
        total: usize,
        device: &B::Device,
    ) -> Result<Vec<Generation>> {
        if self.world == 1 {
            return Ok(local);
        }
        let mut head = vec![0.0; 2 * total];
        for (i, g) in local.iter().enumerate() {
            head[start + i] = g.tokens.len() as f64;
            head[total + start + i] = if g.stopped { 1.0 } else { 0.0 };
        }
        let head = self.sum_values::<B>(&head, device)?;
        let lens: Vec<usize> = head[..total].iter().map(|&l| l.round() as usize).collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        if width == 0 {
            return Ok((0..total)
                .map(|i| Generation {
                    tokens: vec![],
                    logprobs: vec![],
                    stopped: head[total + i] > 0.5,
                })
                .collect());
        }
        // Token ids (exact in f32 below 2^24) then log-probs, each rank's rows in place and zeros
        // elsewhere: the sum is every rank's values, bit for bit.
        let mut buf = vec![0f32; 2 * total * width];
        for (i, g) in local.iter().enumerate() {
            for (j, (&t, &lp)) in g.tokens.iter().zip(&g.logprobs).enumerate() {
                buf[(start + i) * width + j] = t as f32;
                buf[(total + start + i) * width + j] = lp;
            }
        }
        let buf = self
            .all_reduce_sum(Tensor::<B, 1>::from_floats(buf.as_slice(), device))?
            .into_data()
            .convert::<f32>();
        let buf = buf.as_slice::<f32>().map_err(|e| anyhow!("{e:?}"))?;
        Ok((0..total)
            .map(|i| Generation {
                tokens: buf[i * width..i * width + lens[i]]
                    .iter()
                    .map(|&t| t.round() as u32)
                    .collect(),
                logprobs: buf[(total + i) * width..(total + i) * width + lens[i]].to_vec(),
                stopped: head[total + i] > 0.5,
            })
            .collect())
    }

    /// The gradients summed over the ranks, in the module's order (the same on every rank).
    /// First one all-reduce of which trainable parameters each rank has a gradient for: a
    /// parameter no rank reached (the vision tower on a step of text only) stays without a
    /// gradient, as on one rank (AdamW then leaves it and its moments alone); one that some
    /// ranks reached is summed with zeros from the others (no rank waits on a tensor another
    /// never sends).
    pub fn all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        if self.world == 1 {
            return Ok(grads);
        }
        struct Present<'a, B: Backend> {
            grads: &'a GradientsParams,
            has: Vec<f64>,
            device: Option<B::Device>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Present<'_, B::InnerBackend> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if param.is_require_grad() {
                    self.has.push(
                        if self.grads.get::<B::InnerBackend, D>(param.id).is_some() {
                            1.0
                        } else {
                            0.0
                        },
                    );
                    self.device.get_or_insert_with(|| param.val().device());
                }
            }
        }
        let mut present = Present::<B::InnerBackend> {
            grads: &grads,
            has: vec![],
            device: None,
        };
        module.visit(&mut present);
        let Some(device) = present.device else {
            return Ok(grads);
        };
        let anywhere: Vec<bool> = self
            .sum_values::<B::InnerBackend>(&present.has, &device)?
            .into_iter()
            .map(|n| n > 0.5)
            .collect();

        struct Reduce<'a> {
            rank: &'a Rank,
            grads: GradientsParams,
            anywhere: std::vec::IntoIter<bool>,
            error: Option<anyhow::Error>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Reduce<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if !param.is_require_grad() {
                    return;
                }
                let reached = self.anywhere.next().unwrap_or(false);
                if self.error.is_some() || !reached {
                    return;
                }
                let g = self
                    .grads
                    .remove::<B::InnerBackend, D>(param.id)
                    .unwrap_or_else(|| {
                        let p = param.val();
                        Tensor::<B::InnerBackend, D>::zeros(p.shape(), &p.device())
                    });
                match self.rank.all_reduce_sum(g) {
                    Ok(g) => self.grads.register::<B::InnerBackend, D>(param.id, g),
                    Err(e) => self.error = Some(e),
                }
            }
        }
        let mut v = Reduce {
            rank: self,
            grads,
            anywhere: anywhere.into_iter(),
            error: None,
        };
        module.visit(&mut v);
        match v.error {
            Some(e) => Err(e),
            None => Ok(v.grads),
        }
    }
}

/// One collective run at a time per process (burn-collective has one local server per backend).
static SESSION: Mutex<()> = Mutex::new(());

/// Runs `work` on every local rank of `cfg`, each on its device, and returns their results in
/// rank order. One rank: `work` runs on this thread, without any collective. Several: one thread
/// per rank, registered with burn-collective; the first rank that fails stops the others, and
/// the error names it. Several nodes: the same on each node's process, the nodes meeting at
/// `parallel.coordinator` (node 0 hosts burn-collective's orchestrator there); a node whose
/// process ends makes the others' next all-reduce fail, naming its ranks.
pub fn run_ranks<B, T, F>(
    cfg: &ParallelConfig,
    backend: BackendKind,
    first: &B::Device,
    work: F,
) -> Result<Vec<T>>
where
    B: Backend,
    T: Send,
    F: Fn(Rank, B::Device) -> Result<T> + Sync,
{
    let local = cfg.local_ranks();
    if cfg.world_size() == 1 {
        return Ok(vec![work(
            Rank::single(),
            rank_device::<B>(cfg, backend, first, 0),
        )?]);
    }
    let _session = SESSION.lock().unwrap_or_else(|e| e.into_inner());
    burn_collective::reset_collective::<B>();
    let mut config = CollectiveConfig::default()
        .with_num_devices(local)
        .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
    let (mut orchestrator, mut nodes) = (None, None);
    if cfg.nodes > 1 {
        let (c, o, n) = join_nodes(cfg, config)?;
        (config, orchestrator, nodes) = (c, o, Some(n));
    }
    let aborted = Arc::new(AtomicBool::new(false));
    let results: Vec<Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..local)
            .map(|i| {
                let rank = Rank {
                    rank: cfg.node_rank * local + i,
                    world: cfg.world_size(),
                    aborted: aborted.clone(),
                    nodes,
                };
                let device = rank_device::<B>(cfg, backend, first, i);
                let (work, config, aborted) = (&work, config.clone(), aborted.clone());
                std::thread::Builder::new()
                    .name(format!("rank-{}", rank.rank))
                    .spawn_scoped(scope, move || {
                        let id = rank.rank;
                        let out = (|| -> Result<T> {
                            burn_collective::register::<B>(
                                PeerId(id as u32),
                                device.clone(),
                                config,
                            )
                            .map_err(|e| {
                                anyhow!("rank {id}: joining the collective failed: {e:?}")
                            })?;
                            // A panic must stop the others too (else they wait on it forever).
                            let out =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    work(rank, device)
                                }))
                                .unwrap_or_else(|p| {
                                    Err(anyhow!("rank {id} panicked: {}", panic_message(&p)))
                                })?;
                            burn_collective::finish_collective::<B>(PeerId(id as u32)).map_err(
                                |e| anyhow!("rank {id}: leaving the collective failed: {e:?}"),
                            )?;
                            Ok(out)
                        })();
                        if out.is_err() && !aborted.swap(true, Ordering::SeqCst) {
                            // The first failure: make the others' pending all-reduce fail now.
                            burn_collective::reset_collective::<B>();
                        }
                        (out, id)
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok((r, id)) => {
                    r.map_err(|e| e.context(format!("rank {id} of {}", cfg.world_size())))
                }
                Err(_) => Err(anyhow!("a rank thread panicked")),
            })
            .collect()
    });
    burn_collective::reset_collective::<B>();
    // The error of the rank that failed first (the others only report that one failed).
    let mut first_error = None;
    let mut outs = Vec::with_capacity(local);
    for r in results {
        match r {
            Ok(v) => outs.push(v),
            Err(e) => {
                // Secondary: stopped because another rank of this node failed (a lost node is a cause).
                let text = format!("{e:#}");
                let secondary = text.contains("another rank failed")
                    || (text.contains("all-reduce failed")
                        && !text.contains("all-reduce failed: lost "));
                match &first_error {
                    None => first_error = Some((e, secondary)),
                    Some((_, true)) if !secondary => first_error = Some((e, secondary)),
                    _ => {}
                }
            }
        }
    }
    if let Some((e, _)) = first_error {
        return Err(e);
    }
    if let Some(o) = orchestrator.take() {
        // The others unregister from node 0's orchestrator after their last all-reduce: wait
        // for them (bounded) before this process, and the orchestrator with it, ends.
        if !o.wait_all_finished(std::time::Duration::from_secs(60)) {
            eprintln!(
                "warning: not every node had left the collective 60 s after this one finished"
            );
        }
    }
    Ok(outs)
}

/// The multi-node part of `config`: the nodes' rendezvous at the coordinator (hosted here on
/// node 0) and this node's tensor service on `port + 1 + node_rank`.
fn join_nodes(
    cfg: &ParallelConfig,
    config: CollectiveConfig,
) -> Result<(CollectiveConfig, Option<Orchestrator>, NodePorts)> {
    let coordinator = cfg.coordinator.as_deref().unwrap_or_default();
    let (host, port) = parse_host_port(coordinator).ok_or_else(|| {
        anyhow!("parallel.coordinator must be \"host:port\", got \"{coordinator}\"")
    })?;
    let nodes = NodePorts {
        base: port,
        local: cfg.local_ranks(),
    };
    let data_port = nodes.data_port(cfg.node_rank);
    let orchestrator = if cfg.node_rank == 0 {
        Some(Orchestrator::start(port)?)
    } else {
        None
    };
    check_port_free(
        data_port,
        &format!(
            "node {}'s tensor service (parallel.coordinator's port + 1 + node_rank)",
            cfg.node_rank
        ),
    )?;
    let me = match &cfg.node_address {
        Some(a) => a.clone(),
        None => address_towards(&host, port).with_context(|| {
            format!(
                "finding this machine's address towards {coordinator} (set parallel.node_address)"
            )
        })?,
    };
    let ws = |h: &str, p: u16| format!("ws://{h}:{p}").parse().expect("an address parses");
    let config = config
        .with_num_nodes(cfg.nodes as u32)
        .with_global_address(ws(&host, port))
        .with_node_address(ws(&me, data_port))
        .with_data_service_port(data_port)
        // Any tensor shape (the ring needs a dimension of at least `nodes`; counts have one element).
        .with_global_all_reduce_strategy(AllReduceStrategy::Centralized);
    eprintln!(
        "parallel: node {} of {} ({} ranks each), meeting at {coordinator}, serving tensors at {me}:{data_port}",
        cfg.node_rank, cfg.nodes, nodes.local
    );
    Ok((config, orchestrator, nodes))
}

/// The IP of this machine's interface that reaches `host:port` (a UDP "connect" sends nothing).
fn address_towards(host: &str, port: u16) -> Result<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect((host, port))?;
    Ok(socket.local_addr()?.ip().to_string())
}

fn check_port_free(port: u16, what: &str) -> Result<()> {
    std::net::TcpListener::bind(("0.0.0.0", port))
        .map(drop)
        .with_context(|| format!("port {port} for {what} is not free"))
}

/// burn-collective's global orchestrator, which node 0 hosts on its own runtime: the nodes
/// register there (the rendezvous) and unregister at the end.
struct Orchestrator {
    runtime: tokio::runtime::Runtime,
    all_finished: Arc<tokio::sync::Notify>,
}

impl Orchestrator {
    fn start(port: u16) -> Result<Self> {
        check_port_free(port, "the coordinator (parallel.coordinator)")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("orchestrator")
            .enable_all()
            .build()?;
        let all_finished = Arc::new(tokio::sync::Notify::new());
        let notify = all_finished.clone();
        runtime.spawn(async move {
            if let Err(e) = burn_collective::start_global_orchestrator_with(
                port,
                std::future::pending(),
                notify,
            )
            .await
            {
                eprintln!("error: the coordinator on port {port} stopped: {e:?}");
            }
        });
        Ok(Self {
            runtime,
            all_finished,
        })
    }

    /// Waits until every node has unregistered (at most `timeout`); `false` when one has not.
    fn wait_all_finished(self, timeout: std::time::Duration) -> bool {
        let all_finished = self.all_finished.clone();
        // The timer needs the runtime's context: build it inside the block.
        let done = self
            .runtime
            .block_on(async move { tokio::time::timeout(timeout, all_finished.notified()).await })
            .is_ok();
        self.runtime.shutdown_background();
        done
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The device of local rank `i`: on the CPU backends the one device (the ranks are workers
/// sharing it); else the `i`-th of `parallel.devices` (a count starts at `first`'s index).
pub fn rank_device<B: Backend>(
    cfg: &ParallelConfig,
    backend: BackendKind,
    first: &B::Device,
    i: usize,
) -> B::Device {
    if backend.is_cpu() {
        return first.clone();
    }
    let id = first.to_id();
    let index = cfg.device_index(id.index_id as usize, i);
    if index == id.index_id as usize {
        return first.clone();
    }
    B::Device::from_id(DeviceId {
        type_id: id.type_id,
        index_id: index as u16,
    })
}

/// The range of `0..n` that `rank` of `world` takes: contiguous pieces of `ceil(n / world)`.
pub fn shard_range(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(world.max(1));
    (rank * per).min(n)..((rank + 1) * per).min(n)
}

/// Splits a step's rows into the shard of `rank`: contiguous pieces of at most `per_rank` rows
/// (the last ranks get fewer, or none, when the step is short).
pub fn shard<T: Clone>(rows: &[T], rank: usize, per_rank: usize) -> Vec<T> {
    let start = (rank * per_rank).min(rows.len());
    let end = ((rank + 1) * per_rank).min(rows.len());
    rows[start..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_and_cover_the_step() {
        for len in 0..20 {
            let rows: Vec<usize> = (0..len).collect();
            for world in 1..5 {
                let per = len.div_ceil(world).max(1);
                let all: Vec<usize> = (0..world).flat_map(|r| shard(&rows, r, per)).collect();
                assert_eq!(all, rows);
            }
        }
    }

    #[test]
    fn config_checks() {
        let mut e = vec![];
        ParallelConfig {
            nodes: 2,
            ..Default::default()
        }
        .check(&mut e);
        assert!(e[0].contains("coordinator"), "{e:?}");
        let mut e = vec![];
        ParallelConfig {
            nodes: 2,
            node_rank: 2,
            coordinator: Some("h:1".into()),
            ..Default::default()
        }
        .check(&mut e);
        assert!(e[0].contains("node_rank"), "{e:?}");
        let mut e = vec![];
        ParallelConfig {
            devices: Devices::Ids(vec![1, 1]),
            ..Default::default()
        }
        .check(&mut e);
        assert!(e[0].contains("twice"), "{e:?}");
        assert_eq!(
            parse_host_port("10.0.0.1:29500"),
            Some(("10.0.0.1".into(), 29500))
        );
        assert_eq!(parse_host_port("nohost"), None);
    }
}
