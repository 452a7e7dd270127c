//! Id allocation for backends and services: lowest free id first, so ids stay dense (the
//! backend map is an array indexed by id) and a restarted agent, which rebuilds the pools
//! from the maps, hands out the same ids as the one before it would have.
use std::collections::BTreeSet;

/// Ids handed out lowest first: the free ids below `next`, then `next`. Id 0 is never
/// handed out (it means "none" in the maps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdPool {
    free: BTreeSet<u32>,
    next: u32,
}

impl IdPool {
    pub fn from_used(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().filter(|id| *id != 0).collect();
        let max = used.last().copied().unwrap_or(0);
        Self {
            free: (1..=max).filter(|id| !used.contains(id)).collect(),
            next: max + 1,
        }
    }

    pub fn take(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        let id = self.next.max(1);
        self.next = id + 1;
        id
    }

    pub fn mark_used(&mut self, id: u32) {
        if id >= self.next {
            self.free.extend(self.next.max(1)..id);
            self.next = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    pub fn release(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_lowest_first_and_come_back_when_released() {
        let mut p = IdPool::from_used([2, 5]);
        assert_eq!((p.take(), p.take(), p.take(), p.take()), (1, 3, 4, 6));
        p.release(3);
        p.mark_used(9);
        assert_eq!((p.take(), p.take(), p.take()), (3, 7, 8));
        assert_eq!(p.take(), 10);
    }
}
