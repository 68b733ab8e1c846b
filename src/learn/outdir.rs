//! A run's output directory is its own: a run never starts over an earlier run's files unless told
//! to, `--resume` says what it resumes, one process at a time writes there, and old checkpoints
//! go only once newer ones are complete.
//!
//! - **Claim** ([`claim`]): a directory that holds a run (metrics, checkpoints, an export) is an
//!   error naming what is there, unless `--resume` (continue from its newest complete checkpoint;
//!   an error when there is none), `--resume=auto` (continue when there is one, else start fresh,
//!   as verl's `resume_mode=auto`) or `--overwrite` (remove the earlier run's files first; only
//!   files a run writes, never others).
//! - **Lock**: `output_dir/.infimed.lock`, held with `flock` for the run's life: a second process
//!   on the same directory refuses, naming the first. The kernel releases the lock when the
//!   process ends, however it ends, so a killed run leaves no stale lock.
//! - **Retention** ([`prune_checkpoints`]): after each complete checkpoint, all but the newest
//!   `keep_checkpoints` complete ones are removed.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::learn::checkpoint::{complete_checkpoints, latest_checkpoint};
use crate::learn::tensorboard::{hostname, wall_time};
use crate::model::AUX_FILES;

/// What `--resume` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResumeMode {
    /// Continue from the newest complete checkpoint; an error when there is none.
    Required,
    /// Continue from the newest complete checkpoint when there is one, else start fresh.
    Auto,
}

/// Files of the model directory a run exports besides its weights (`model*.safetensors`); the
/// files it copies from its base model are [`AUX_FILES`].
const EXPORT_FILES: &[&str] = &["model.safetensors.index.json", "config.json"];

/// Files and directories of a run, other than the export.
const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "samples.jsonl",
    "completions.jsonl",
    "recipe.toml",
    "tensorboard",
];

/// What an output directory holds of a run.
#[derive(Debug, Default)]
pub struct RunContents {
    pub metrics_lines: Option<usize>,
    /// Steps of the complete checkpoints, ascending.
    pub checkpoints: Vec<usize>,
    /// The exported model's weights (`model.safetensors` or shards).
    pub export: Vec<String>,
    /// Everything of a run that `--overwrite` removes.
    files: Vec<PathBuf>,
}

impl RunContents {
    pub fn read(dir: &Path) -> Result<Self> {
        let mut c = RunContents::default();
        if !dir.exists() {
            return Ok(c);
        }
        c.checkpoints = complete_checkpoints(dir)?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let metrics = dir.join("metrics.jsonl");
        if metrics.exists() {
            let text = std::fs::read_to_string(&metrics)
                .with_context(|| format!("reading {}", metrics.display()))?;
            c.metrics_lines = Some(text.lines().count());
        }
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let weights = name.starts_with("model") && name.ends_with(".safetensors");
            if weights {
                c.export.push(name.clone());
            }
            let checkpoint =
                name.starts_with("checkpoint-") || name.starts_with(".tmp-checkpoint-");
            let plot = name.ends_with(".svg");
            if weights
                || checkpoint
                || plot
                || RUN_FILES.contains(&name.as_str())
                || EXPORT_FILES.contains(&name.as_str())
                || AUX_FILES.contains(&name.as_str())
            {
                c.files.push(p);
            }
        }
        c.export.sort();
        Ok(c)
    }

    /// Whether this is a run's (metrics, checkpoints or an exported model).
    pub fn is_run(&self) -> bool {
        self.metrics_lines.is_some() || !self.checkpoints.is_empty() || !self.export.is_empty()
    }

    /// "metrics.jsonl (1,212 lines), 12 checkpoints (steps 100..1200), an exported model
    /// (model.safetensors)".
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if let Some(n) = self.metrics_lines {
            parts.push(format!("metrics.jsonl ({n} lines)"));
        }
        match self.checkpoints.as_slice() {
            [] => {}
            [s] => parts.push(format!("checkpoint-{s}")),
            [first, .., last] => parts.push(format!(
                "{} checkpoints (steps {first}..{last})",
                self.checkpoints.len()
            )),
        }
        if !self.export.is_empty() {
            parts.push(format!("an exported model ({})", self.export.join(", ")));
        }
        parts.join(", ")
    }
}

/// How a run starts in its output directory, decided once: fresh, or from a checkpoint.
#[derive(Debug)]
pub struct Claim {
    /// Continue from the newest complete checkpoint.
    pub resume: bool,
    /// Held for the run's life (node 0; `None` on the other nodes of a multi-node run, which
    /// write nothing there).
    pub lock: Option<RunLock>,
}

/// Claims `dir` for a run (see the module docs). `main_node`: this process writes the run's
/// files (node 0); the other nodes only read the checkpoint they resume from, and neither lock
/// nor check the directory.
pub fn claim(
    dir: &Path,
    resume: Option<ResumeMode>,
    overwrite: bool,
    main_node: bool,
) -> Result<Claim> {
    if !main_node {
        let resume = match resume {
            Some(_) => latest_checkpoint(dir)?.is_some(),
            None => false,
        };
        return Ok(Claim { resume, lock: None });
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut lock = RunLock::acquire(dir)?;
    let contents = RunContents::read(dir)?;
    let dir_s = dir.display();
    let resume = match (resume, contents.checkpoints.is_empty()) {
        (Some(_), false) => true,
        (Some(ResumeMode::Required), true) => {
            let there = if contents.is_run() {
                contents.describe()
            } else {
                "no run".into()
            };
            bail!(
                "--resume: nothing to resume in {dir_s}: no complete checkpoint-N there ({there}). \
                 --resume=auto starts fresh when there is none"
            )
        }
        (Some(ResumeMode::Auto), true) => {
            if contents.is_run() {
                eprintln!(
                    "--resume=auto: no checkpoint in {dir_s}: starting fresh; the earlier attempt's files are replaced ({})",
                    contents.describe()
                );
                remove_run(&contents)?;
            }
            false
        }
        (None, _) if overwrite => {
            if contents.is_run() || !contents.files.is_empty() {
                eprintln!(
                    "--overwrite: removing the earlier run in {dir_s} ({})",
                    contents.describe()
                );
                remove_run(&contents)?;
            }
            false
        }
        (None, _) if contents.is_run() => bail!(
            "{dir_s} holds a run: {}. To continue it: --resume. To replace it: --overwrite. Or set \
             output_dir to another folder.",
            contents.describe()
        ),
        (None, _) => false,
    };
    lock.note_holder()?;
    Ok(Claim {
        resume,
        lock: Some(lock),
    })
}

/// Removes the files of a run (never other files of the directory).
fn remove_run(contents: &RunContents) -> Result<()> {
    for p in &contents.files {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        r.with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// `output_dir/.infimed.lock`, locked (`flock`, exclusive) while a run writes there.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(".infimed.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor this process holds open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "{} is in use by another infimed run ({}): one run per output_dir",
                    dir.display(),
                    holder.trim()
                );
            }
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        Ok(Self { file, path })
    }

    /// Write who holds the lock into the file (for the message of a process that finds it held).
    fn note_holder(&mut self) -> Result<()> {
        let started = wall_time() as u64;
        let who = format!(
            "pid {} on {}, started at unix time {started}\n",
            std::process::id(),
            hostname()
        );
        self.file
            .set_len(0)
            .and_then(|_| self.file.write_all(who.as_bytes()))
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Removes all but the newest `keep` complete checkpoints of `dir` (0: keep all). Called once a
/// new checkpoint is complete, so the checkpoint a run resumed from goes only when a newer one
/// stands.
pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(vec![]);
    }
    let all = complete_checkpoints(dir)?;
    let old = all.len().saturating_sub(keep);
    let mut removed = vec![];
    for (_, p) in all.into_iter().take(old) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}
