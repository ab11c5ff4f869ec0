//! Per-model embedding cache: LRU bounded in bytes, remembering recent evictions so that a
//! stale handle gets "evicted" rather than "unknown".

use crate::predictor::ImageEmbedding;
use lru::LruCache;

pub struct EmbeddingCache {
    entries: LruCache<String, (ImageEmbedding, u64)>,
    evicted: LruCache<String, ()>,
    bytes: u64,
    max_bytes: u64,
}

pub enum Lookup<'a> {
    Hit(&'a ImageEmbedding),
    Evicted,
    Unknown,
}

impl EmbeddingCache {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            entries: LruCache::unbounded(),
            evicted: LruCache::new(std::num::NonZeroUsize::new(16_384).expect("non-zero")),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn get(&mut self, key: &str) -> Lookup<'_> {
        if self.entries.contains(key) {
            return Lookup::Hit(&self.entries.get(key).expect("present").0);
        }
        if self.evicted.contains(key) {
            Lookup::Evicted
        } else {
            Lookup::Unknown
        }
    }

    /// Inserts, then evicts least recently used entries until within budget. An embedding larger
    /// than the whole budget is not kept (the caller still has it for this request).
    pub fn insert(&mut self, key: String, emb: ImageEmbedding) {
        let size = emb.nbytes();
        if size > self.max_bytes {
            self.evicted.put(key, ());
            return;
        }
        self.evicted.pop(&key);
        if let Some((_, old)) = self.entries.put(key, (emb, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > self.max_bytes {
            match self.entries.pop_lru() {
                Some((k, (_, s))) => {
                    self.bytes -= s;
                    self.evicted.put(k, ());
                }
                None => break,
            }
        }
    }
}
