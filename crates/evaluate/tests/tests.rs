//! The `evaluate` binary's integration tests, in one test executable: the command line, exit
//! codes and messages, and the files it writes.

mod cli;
