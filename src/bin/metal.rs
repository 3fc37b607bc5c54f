//! `llm-worker-rbee-metal`: the worker on the metal device. All logic is in the library
//! ([`llm_worker_rbee::server::main`]); this file only names the device.

use std::process::ExitCode;

use candle_core::Device;
use llm_worker_rbee::server::{self, DeviceSpec};

fn main() -> ExitCode {
    server::main(DeviceSpec {
        implementation: "llm-worker-rbee-metal",
        kind: "metal",
        build: Device::new_metal,
    })
}
