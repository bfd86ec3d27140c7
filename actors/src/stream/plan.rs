//! From the logical graph to subtasks: vertices joined by a forward edge
//! with equal parallelism, where the consumer has no other input, are
//! chained into one task (records pass by pointer); every other edge
//! becomes channels, one per pair of upstream and downstream subtasks that
//! exchange records. The plan numbers every channel so that each subtask
//! knows its inputs and outputs, whatever carries them.

use super::channel::Outbox;
use super::edges::{ChannelCounts, EdgeStats};
use super::graph::{AnyBox, AnyFormat, ExternalEdge, Graph, Partitioning, VertexId, VertexKind};
use super::runner::TaskHead;
use std::collections::{BTreeMap, HashMap};

/// One channel: from a subtask of `from` to a subtask of `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelDef {
    /// The edge's index in the graph.
    pub edge: usize,
    /// Upstream vertex and subtask.
    pub from: (VertexId, usize),
    /// Downstream (task head) vertex and subtask.
    pub to: (VertexId, usize),
}

/// A chain of vertices run as one subtask per parallel instance.
#[derive(Debug, Clone)]
pub struct TaskDef {
    /// Index in the plan.
    pub id: usize,
    /// The chain's vertex names joined by ` -> `.
    pub name: String,
    /// The head vertex (a source, or the one reading channels).
    pub head: VertexId,
    /// The head vertex's name as the graph was given it.
    pub head_name: String,
    /// Every vertex in the chain.
    pub vertices: Vec<VertexId>,
    /// Subtasks.
    pub parallelism: usize,
    /// Whether the head is a source.
    pub is_source: bool,
}

/// Subtask `subtask` of task `task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubtaskId {
    /// The task.
    pub task: usize,
    /// Its parallel instance.
    pub subtask: usize,
}

impl std::fmt::Display for SubtaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t{}-{}", self.task, self.subtask)
    }
}

/// The physical plan of a graph.
pub struct Plan {
    graph: Graph,
    /// Tasks, sources first.
    pub tasks: Vec<TaskDef>,
    /// Every channel.
    pub channels: Vec<ChannelDef>,
    chained: Vec<bool>,
    task_of: HashMap<VertexId, usize>,
}

impl Plan {
    /// Chains and numbers the graph.
    pub fn new(graph: Graph) -> Plan {
        let inputs = |v: VertexId| graph.edges.iter().filter(|e| e.to == v).count();
        let chained: Vec<bool> = graph
            .edges
            .iter()
            .map(|e| {
                e.partitioning == Partitioning::Forward
                    && graph.vertices[e.from].parallelism == graph.vertices[e.to].parallelism
                    && inputs(e.to) == 1
                    && matches!(graph.vertices[e.to].kind, VertexKind::Operator { .. })
            })
            .collect();
        let heads: Vec<VertexId> = (0..graph.vertices.len())
            .filter(|&v| {
                !graph
                    .edges
                    .iter()
                    .zip(&chained)
                    .any(|(e, &c)| c && e.to == v)
            })
            .collect();
        let mut tasks = Vec::new();
        let mut task_of = HashMap::new();
        let mut ordered = heads.clone();
        ordered.sort_by_key(|&v| !matches!(graph.vertices[v].kind, VertexKind::Source(_)));
        for head in ordered {
            let id = tasks.len();
            let mut vertices = vec![head];
            let mut at = 0;
            while at < vertices.len() {
                let v = vertices[at];
                for (e, &c) in graph.edges.iter().zip(&chained) {
                    if c && e.from == v {
                        vertices.push(e.to);
                    }
                }
                at += 1;
            }
            for &v in &vertices {
                task_of.insert(v, id);
            }
            let name = vertices
                .iter()
                .map(|&v| graph.vertices[v].name.clone())
                .collect::<Vec<_>>()
                .join(" -> ");
            tasks.push(TaskDef {
                id,
                name,
                head,
                head_name: graph.vertices[head].given_name.clone(),
                parallelism: graph.vertices[head].parallelism,
                is_source: matches!(graph.vertices[head].kind, VertexKind::Source(_)),
                vertices,
            });
        }
        let mut channels = Vec::new();
        for (index, (e, &c)) in graph.edges.iter().zip(&chained).enumerate() {
            if c {
                continue;
            }
            let from_p = graph.vertices[e.from].parallelism;
            let to_p = graph.vertices[e.to].parallelism;
            for a in 0..from_p {
                let targets: Vec<usize> = if e.partitioning == Partitioning::Forward {
                    vec![a % to_p]
                } else {
                    (0..to_p).collect()
                };
                for b in targets {
                    channels.push(ChannelDef {
                        edge: index,
                        from: (e.from, a),
                        to: (e.to, b),
                    });
                }
            }
        }
        Plan {
            graph,
            tasks,
            channels,
            chained,
            task_of,
        }
    }

    /// A vertex's numbered name (`map#2`).
    pub fn vertex_name(&self, vertex: VertexId) -> Option<&str> {
        self.graph.vertices.get(vertex).map(|v| v.name.as_str())
    }

    /// Sums channel counts (from any number of processes) per graph edge,
    /// for every edge that has channels, in edge order.
    pub fn edge_stats(&self, counts: &[ChannelCounts]) -> Vec<EdgeStats> {
        let mut edges: BTreeMap<usize, EdgeStats> = BTreeMap::new();
        let name = |v: usize| self.vertex_name(v).unwrap_or_default().to_string();
        for channel in &self.channels {
            edges.entry(channel.edge).or_insert_with(|| EdgeStats {
                from: name(channel.from.0),
                to: name(channel.to.0),
                ..EdgeStats::default()
            });
        }
        for c in counts {
            let Some(channel) = self.channels.get(c.channel) else {
                continue;
            };
            if let Some(e) = edges.get_mut(&channel.edge) {
                e.batches += c.batches;
                e.bytes += c.bytes;
                e.codec_bytes += c.codec_bytes;
                e.copied_bytes += c.copied_bytes;
            }
        }
        edges.into_values().collect()
    }

    /// Every subtask of the plan, sources first.
    pub fn subtasks(&self) -> Vec<SubtaskId> {
        self.tasks
            .iter()
            .flat_map(|t| {
                (0..t.parallelism).map(move |s| SubtaskId {
                    task: t.id,
                    subtask: s,
                })
            })
            .collect()
    }

    /// The subtasks that are sources.
    pub fn sources(&self) -> Vec<SubtaskId> {
        self.subtasks()
            .into_iter()
            .filter(|s| self.tasks[s.task].is_source)
            .collect()
    }

    /// Indices (into [`Plan::channels`]) of the channels feeding a
    /// subtask, in the order its inbox numbers them.
    pub fn inputs_of(&self, id: SubtaskId) -> Vec<usize> {
        let head = self.tasks[id.task].head;
        self.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| c.to == (head, id.subtask))
            .map(|(i, _)| i)
            .collect()
    }

    /// Indices (into [`Plan::channels`]) of the channels a subtask
    /// sends on, in the order its outbox numbers them.
    pub fn outputs_of(&self, id: SubtaskId) -> Vec<usize> {
        let vertices = &self.tasks[id.task].vertices;
        self.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| vertices.contains(&c.from.0) && c.from.1 == id.subtask)
            .map(|(i, _)| i)
            .collect()
    }

    /// The task a vertex runs in.
    pub fn task_of(&self, vertex: VertexId) -> Option<usize> {
        self.task_of.get(&vertex).copied()
    }

    /// Builds a subtask's chain. `outbox()` makes a handle on the
    /// subtask's output channels, numbered as [`Plan::outputs_of`].
    pub fn build(&self, id: SubtaskId, outbox: &dyn Fn() -> Box<dyn Outbox>) -> TaskHead {
        let task = &self.tasks[id.task];
        let outputs = self.outputs_of(id);
        let head = task.head;
        let downstream = self.downstream(head, id.subtask, &outputs, outbox);
        match &self.graph.vertices[head].kind {
            VertexKind::Source(make) => {
                TaskHead::Source(make(id.subtask, task.parallelism, downstream))
            }
            VertexKind::Operator { make, batch_in } => TaskHead::Inputs {
                sink: batch_in(make(id.subtask, downstream), self.input_format(head)),
                channels: self.inputs_of(id).len(),
            },
        }
    }

    /// The columnar format of what reaches `head` over channels: that of
    /// its upstream vertices (they share its input type).
    fn input_format(&self, head: VertexId) -> Option<&AnyFormat> {
        self.graph
            .edges
            .iter()
            .filter(|e| e.to == head)
            .find_map(|e| self.graph.vertices.get(e.from)?.format.as_ref())
    }

    fn downstream(
        &self,
        vertex: VertexId,
        subtask: usize,
        outputs: &[usize],
        outbox: &dyn Fn() -> Box<dyn Outbox>,
    ) -> AnyBox {
        let v = &self.graph.vertices[vertex];
        let mut stages: Vec<AnyBox> = Vec::new();
        let mut external: Vec<ExternalEdge> = Vec::new();
        for (index, (e, &c)) in self.graph.edges.iter().zip(&self.chained).enumerate() {
            if e.from != vertex {
                continue;
            }
            if c {
                let next = self.downstream(e.to, subtask, outputs, outbox);
                if let VertexKind::Operator { make, .. } = &self.graph.vertices[e.to].kind {
                    stages.push(make(subtask, next));
                }
            } else {
                let mut targets: Vec<(usize, usize)> = outputs
                    .iter()
                    .enumerate()
                    .filter(|(_, &ch)| self.channels[ch].edge == index)
                    .map(|(slot, &ch)| (self.channels[ch].to.1, slot))
                    .collect();
                targets.sort_unstable();
                external.push((
                    e.partitioning,
                    e.hash.clone(),
                    targets.into_iter().map(|(_, slot)| slot).collect(),
                ));
            }
        }
        if !external.is_empty() {
            stages.push((v.channel_out)(external, outbox(), v.batch_records()));
        }
        (v.fan_out)(stages)
    }
}
