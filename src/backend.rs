//! `mvmm backend blk|net`: device models served as vhost-user backends (being written).

use crate::cli::BackendCommand;

pub fn run(command: &BackendCommand) -> i32 {
    log::error!("`mvmm backend` is not available in this build yet ({command:?})");
    crate::EXIT_FAILURE
}
