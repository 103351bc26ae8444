//! The ONNX Runtime library and environment.
//!
//! verdict loads `libonnxruntime.so` at run time (`ort`'s `load-dynamic`), because the library
//! is not something a Rust build can download here: it comes from PyPI's `onnxruntime` wheel
//! (or `onnxruntime-gpu` for CUDA), which the setup script installs into `.venv`. ONNX Runtime
//! allows one environment per process, so it is created once and shared by every workload.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::{Result, ScorerError};

/// Environment variable naming the library file, as `ort` itself documents it.
pub const LIBRARY_ENV: &str = "ORT_DYLIB_PATH";

static ENVIRONMENT: OnceLock<(Environment, PathBuf)> = OnceLock::new();

/// The process's ONNX Runtime environment, created on first use from `configured` (the
/// config's `onnxruntime-library`) or the library [`find_library`] finds. Later calls return
/// the first environment whatever they pass.
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment> {
    if let Some((env, _)) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let library = find_library(configured)?;
    let builder = ort::init_from(&library).map_err(|e| {
        ScorerError::Library(format!("{}: could not be loaded: {e}", library.display()))
    })?;
    let env = builder.with_name("verdict").build()?;
    tracing::info!(library = %library.display(), "ONNX Runtime loaded");
    // A concurrent first call may have won; ONNX Runtime refuses a second environment, so
    // that can only happen with the same library.
    Ok(&ENVIRONMENT.get_or_init(|| (env, library)).0)
}

/// Where `libonnxruntime.so` is, in this order: the configured path, `$ORT_DYLIB_PATH`, the
/// `onnxruntime` wheel in a `.venv` next to the working directory, the executable or this
/// source tree (or any of their parents).
pub fn find_library(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = configured {
        return existing(path, "the config's onnxruntime-library");
    }
    if let Some(path) = std::env::var_os(LIBRARY_ENV) {
        return existing(Path::new(&path), LIBRARY_ENV);
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.extend(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(Path::to_path_buf),
    );
    for root in roots {
        if let Some(found) = library_in_venv(&root.join(".venv")) {
            return Ok(found);
        }
    }
    Err(ScorerError::Library(format!(
        "libonnxruntime.so not found. Run the setup (`deploy/setup.sh`, which installs the onnxruntime \
         wheel into .venv), or point {LIBRARY_ENV} or the config's `onnxruntime-library` at the \
         library file (e.g. .venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1)"
    )))
}

fn existing(path: &Path, source: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(ScorerError::Library(format!(
            "{} (from {source}) is not a file",
            path.display()
        )))
    }
}

/// `<venv>/lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so.<version>`.
fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    for python in lib.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut candidates: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        candidates.sort();
        if let Some(found) = candidates.pop() {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_path_that_does_not_exist_says_so() {
        let err = find_library(Some(Path::new("/nonexistent/libonnxruntime.so")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
    }

    #[test]
    fn the_library_is_found_in_the_project_venv() {
        let found = find_library(None).unwrap();
        assert!(
            found.to_string_lossy().contains("libonnxruntime.so"),
            "{found:?}"
        );
    }
}
