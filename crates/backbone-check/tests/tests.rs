//! `backbone-check` and `scripts/gpu_check.sh` through their command lines, in one test
//! executable.

mod cli;
mod gpu_check;
