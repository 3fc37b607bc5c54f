//! `llm-worker-rbee-cpu`: the worker on the cpu device. All logic is in the library
//! ([`llm_worker_rbee::server::main`]); this file only names the device.

use std::process::ExitCode;

use candle_core::Device;
use llm_worker_rbee::server::{self, DeviceSpec};

fn main() -> ExitCode {
    server::main(DeviceSpec {
        implementation: "llm-worker-rbee-cpu",
        kind: "cpu",
        build: |_index| Ok(Device::Cpu),
    })
}
