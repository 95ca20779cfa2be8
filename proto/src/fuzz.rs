//! Fuzzing the decoders of untrusted bytes: the targets' shared machinery and the job spec target.
//!
//! Every fuzz target is a plain function of bytes in a library crate (this module,
//! `gangway_scheduler::fuzz`, `gangway_consensus::fuzz`), so the same function runs two ways:
//!
//! - `cargo test` (so `make test`, on stable): [`short_run`] feeds it its seeds and a few thousand
//!   deterministic mutants of them (seconds per target);
//! - `make fuzz` (nightly): `fuzz/` is a cargo-fuzz project whose targets call the same functions
//!   under libFuzzer, starting from the same seeds ([`export_seeds`]).
//!
//! A target returns quietly whatever the bytes: an error is an answer, a panic is a bug.

use crate::spec::{JobSpec, MAX_COMMAND_ARGS, MAX_COMMAND_BYTES, MAX_ENV_BYTES, MAX_ENV_VARS};

/// Where `make fuzz` asks the short runs to write each target's seeds (`<dir>/<target>/seed-N`).
pub const CORPUS_ENV: &str = "GANGWAY_FUZZ_CORPUS";

/// A small deterministic mutator (xorshift): flips, overwrites with boundary values, inserts,
/// deletes, duplicates, truncates, and splices with another seed.
pub struct Mutator {
    state: u64,
}

/// Bytes and words that tend to sit on decoders' edges: lengths of 0, 1, all ones, signs.
const INTERESTING: [u64; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xffff_ffff, u64::MAX, 1 << 62];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// A mutant of `input`: one to four edits, splices drawing from `others`.
    pub fn mutate(&mut self, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=self.below(4) {
            let len = out.len();
            match self.below(8) {
                0 if len > 0 => {
                    let at = self.below(len);
                    out[at] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let at = self.below(len);
                    out[at] = self.next() as u8;
                }
                2 if len > 0 => {
                    let word = INTERESTING[self.below(INTERESTING.len())].to_le_bytes();
                    let at = self.below(len);
                    let n = (1 + self.below(8)).min(len - at);
                    out[at..at + n].copy_from_slice(&word[..n]);
                }
                3 => {
                    let at = self.below(len + 1);
                    let n = 1 + self.below(16);
                    let bytes: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                    out.splice(at..at, bytes);
                }
                4 if len > 0 => {
                    let at = self.below(len);
                    let n = 1 + self.below((len - at).min(64));
                    out.drain(at..at + n);
                }
                5 if len > 0 => {
                    let at = self.below(len);
                    let n = 1 + self.below((len - at).min(64));
                    let copy = out[at..at + n].to_vec();
                    let to = self.below(len + 1);
                    out.splice(to..to, copy);
                }
                6 => out.truncate(self.below(len + 1)),
                _ if !others.is_empty() => {
                    let other = &others[self.below(others.len())];
                    let from = self.below(other.len() + 1);
                    let at = self.below(len + 1);
                    out.truncate(at);
                    out.extend_from_slice(&other[from..]);
                }
                _ => {}
            }
        }
        out
    }
}

/// Runs `target` on every seed and every input a long run once crashed on
/// (`fuzz/regressions/<name>/`, kept in the tree), then on `rounds` mutants of the seeds
/// (deterministic: the same inputs every run), and writes the seeds for `make fuzz` when
/// [`CORPUS_ENV`] is set.
pub fn short_run(name: &str, seeds: &[Vec<u8>], rounds: usize, target: impl Fn(&[u8])) {
    export_seeds(name, seeds);
    for seed in seeds.iter().chain(&regressions(name)) {
        target(seed);
    }
    if seeds.is_empty() {
        return;
    }
    let mut m = Mutator::new(name.len() as u64 + rounds as u64);
    let mut input = seeds[0].clone();
    for i in 0..rounds {
        // Half the time start again from a seed, half the time mutate the last mutant further.
        if i % 2 == 0 {
            input = seeds[i / 2 % seeds.len()].clone();
        }
        input = m.mutate(&input, seeds);
        target(&input);
    }
}

/// The inputs that once crashed target `name` (`fuzz/regressions/<name>/*`), in name order.
pub fn regressions(name: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Writes `seeds` as `$GANGWAY_FUZZ_CORPUS/<name>/seed-<i>` when the variable is set.
pub fn export_seeds(name: &str, seeds: &[Vec<u8>]) {
    let Some(root) = std::env::var_os(CORPUS_ENV) else {
        return;
    };
    let dir = std::path::Path::new(&root).join(name);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return;
    }
    for (i, seed) in seeds.iter().enumerate() {
        let path = dir.join(format!("seed-{i}"));
        if let Err(e) = std::fs::write(&path, seed) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
}

/// The job spec decoder (`SubmitJob`'s text, `gangway submit`): any bytes parse or fail with
/// field errors; an accepted spec keeps every limit.
pub fn spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(spec) = JobSpec::from_toml_str(&text) else {
        return;
    };
    let command_bytes: usize = spec.command.iter().map(String::len).sum();
    assert!(spec.command.len() <= MAX_COMMAND_ARGS && command_bytes <= MAX_COMMAND_BYTES);
    assert!(spec.env.len() + spec.secret_env.len() <= MAX_ENV_VARS);
    let env_bytes: usize = spec
        .env
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + spec
            .secret_env
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    assert!(env_bytes <= MAX_ENV_BYTES);
    assert!(spec.secret_env.keys().all(|k| !spec.env.contains_key(k)));
    assert!(spec.tasks >= 1 && !spec.name.is_empty());
    let _ = format!("{spec:?}");
}

/// Valid specs using every section, and a few near misses.
pub fn spec_seeds() -> Vec<Vec<u8>> {
    [
        "name = \"pretrain\"\nqueue = \"research\"\npriority = 5\ntasks = 16\ncommand = [\"python3\", \"train.py\"]\nestimated_runtime = \"2h\"\n[env]\nNCCL_DEBUG = \"WARN\"\n[secret_env]\nHF_TOKEN = \"hf_abc\"\n[resources]\ndevices = 8\nkind = \"gpu\"\nmodels = [\"H100\"]\ncpu = 32\nmemory = \"512GiB\"\n[topology]\nrequired = \"rack\"\npreferred = \"host\"\n[checkpoint]\nsignal = \"SIGUSR1\"\ntimeout = \"5m\"\n[restart]\nmax_restarts = 3\nbackoff = \"30s\"\nmax_backoff = \"10m\"\n",
        "name = \"x\"\ncommand = [\"true\"]\n[resources]\ndevices = 0.25\n",
        "name = \"cpu\"\ncommand = [\"sh\", \"-c\", \"echo hi\"]\n[resources]\ndevices = 0\ncpu = 1.5\nmemory = 2048\n",
        "name = \"tpu\"\ntasks = 4\ncommand = [\"run\"]\n[resources]\ndevices = 4\nkind = \"tpu\"\n[topology]\nrequired = \"nvlink\"\n",
        "name = \"bad\"\ntasks = 0\ncommand = []\n[env]\nGANGWAY_X = \"1\"\n[secret_env]\nGANGWAY_X = 3\n[resources]\ndevices = 65\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mutator_is_deterministic_and_changes_its_input() {
        let seeds = spec_seeds();
        let run = |seed| {
            let mut m = Mutator::new(seed);
            (0..50)
                .map(|_| m.mutate(&seeds[0], &seeds))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().filter(|m| **m != seeds[0]).count() > 40);
    }

    /// The short run of the spec target: the seeds and 5,000 mutants.
    #[test]
    fn fuzz_spec_short_run() {
        let seeds = spec_seeds();
        assert!(JobSpec::from_toml_str(std::str::from_utf8(&seeds[0]).unwrap()).is_ok());
        short_run("spec", &seeds, 5_000, spec);
    }
}
