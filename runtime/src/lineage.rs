//! Lineage: how an owner rebuilds a stored task output whose every copy
//! was lost with its node, by running the task again (Ray's lineage
//! reconstruction). The owner keeps each live output's recipe (its task's
//! function, encoded arguments and the references they hold), bounded by
//! [`MAX_LINEAGE_BYTES`]; an output whose references are all dropped loses
//! its recipe, and past the bound the oldest recipes go first.

use braid_store::ObjectId;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

/// The most argument bytes an owner keeps in recipes. Past it the oldest
/// recipes are dropped: their outputs can no longer be rebuilt.
pub const MAX_LINEAGE_BYTES: usize = 64 << 20;

/// Rebuilds lost objects this process owns (the task submitter does).
pub(crate) trait Rebuilder: Send + Sync {
    /// Every copy of each of `lost` is gone, and each is `Pending` again:
    /// run its task again, or fail it with [`crate::Error::ObjectLost`]
    /// saying why it cannot be.
    fn rebuild(&self, lost: Vec<ObjectId>);
}

/// Where the process's [`Rebuilder`] is, once its runtime is up.
pub(crate) type RebuilderSlot = Arc<std::sync::OnceLock<Arc<dyn Rebuilder>>>;

/// What tells whether an output is still referenced: a weak pointer to
/// its owner's reference handle.
pub(crate) type Liveness = Weak<dyn std::any::Any + Send + Sync>;

struct Kept<R> {
    recipe: R,
    bytes: usize,
    output: Liveness,
}

/// Recipes of live outputs, oldest first, within a byte bound.
pub(crate) struct LineageTable<R> {
    kept: HashMap<ObjectId, Kept<R>>,
    order: VecDeque<ObjectId>,
    bytes: usize,
    cap: usize,
}

impl<R> LineageTable<R> {
    /// An empty table keeping at most `cap` bytes of recipes.
    pub(crate) fn new(cap: usize) -> LineageTable<R> {
        LineageTable {
            kept: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    /// Keeps how `id` was made while `output` (its owner's reference) lives.
    pub(crate) fn record(&mut self, id: ObjectId, recipe: R, bytes: usize, output: Liveness) {
        if let Some(old) = self.kept.remove(&id) {
            self.bytes -= old.bytes;
        }
        self.kept.insert(
            id,
            Kept {
                recipe,
                bytes,
                output,
            },
        );
        self.order.push_back(id);
        self.bytes += bytes;
        self.trim();
    }

    /// Takes the recipe of `id`, if it is kept and its output still
    /// referenced.
    pub(crate) fn take(&mut self, id: ObjectId) -> Option<R> {
        let kept = self.kept.remove(&id)?;
        self.bytes -= kept.bytes;
        (kept.output.strong_count() > 0).then_some(kept.recipe)
    }

    /// How many bytes the kept recipes hold.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops recipes of outputs no longer referenced, then the oldest ones
    /// while over the bound.
    fn trim(&mut self) {
        if self.bytes <= self.cap && self.order.len() <= 2 * self.kept.len() + 64 {
            return;
        }
        let kept = &mut self.kept;
        let mut freed = 0;
        self.order.retain(|id| match kept.get(id) {
            Some(k) if k.output.strong_count() > 0 => true,
            Some(_) => {
                if let Some(k) = kept.remove(id) {
                    freed += k.bytes;
                }
                false
            }
            None => false,
        });
        self.bytes -= freed;
        while self.bytes > self.cap {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(k) = self.kept.remove(&oldest) {
                self.bytes -= k.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Arc<dyn std::any::Any + Send + Sync> {
        Arc::new(())
    }

    #[test]
    fn a_recipe_lives_as_long_as_its_output_and_within_the_bound() {
        let mut table = LineageTable::new(100);
        let (a, b, c) = (ObjectId::random(), ObjectId::random(), ObjectId::random());
        let (ha, hb) = (live(), live());
        table.record(a, "a", 60, Arc::downgrade(&ha));
        table.record(b, "b", 30, Arc::downgrade(&hb));
        {
            let gone = live();
            table.record(c, "c", 5, Arc::downgrade(&gone));
        }
        assert_eq!(table.take(c), None, "its output is no longer referenced");
        // Over the bound: the oldest goes.
        let hd = live();
        let d = ObjectId::random();
        table.record(d, "d", 50, Arc::downgrade(&hd));
        assert!(table.bytes() <= 100);
        assert_eq!(table.take(a), None, "the oldest recipe was dropped");
        assert_eq!(table.take(b), Some("b"));
        assert_eq!(table.take(d), Some("d"));
        assert_eq!(table.bytes(), 0);
    }
}
