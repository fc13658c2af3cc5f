//! The gossip core's only randomness: SplitMix64 from a seed its driver passes in (the driver
//! draws the seed from the OS; the simulator from its own seed), so that a simulated run
//! replays exactly. `util::rng` is the harness's generator and never part of the product, hence
//! this small twin. Must never read a clock or the OS.

/// A seeded pseudo-random generator (SplitMix64).
#[derive(Clone, Debug)]
pub(crate) struct Random {
    state: u64,
}

impl Random {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound`; 0 when `bound` is 0.
    pub(crate) fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            return 0;
        }
        (self.next_u64() % bound as u64) as usize
    }

    /// Up to `count` distinct elements of `items`, in random order.
    pub(crate) fn choose<T: Clone>(&mut self, items: &[T], count: usize) -> Vec<T> {
        let mut indexes: Vec<usize> = (0..items.len()).collect();
        let take = count.min(items.len());
        for i in 0..take {
            let j = i + self.below(items.len() - i);
            indexes.swap(i, j);
        }
        indexes[..take].iter().map(|&i| items[i].clone()).collect()
    }
}
