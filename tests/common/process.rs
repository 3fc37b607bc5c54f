//! The real worker binary as a child process: started with its stderr forwarded line by line,
//! stopped with SIGTERM, and killed if the test ends first.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the worker may take to exit after SIGTERM.
const EXIT_WAIT: Duration = Duration::from_secs(30);

pub struct WorkerProcess {
    child: Child,
    /// The worker's stderr, one line at a time (each also echoed to the test's stderr, and the
    /// pipe kept drained so that the worker never blocks on it).
    pub lines: mpsc::Receiver<String>,
}

impl WorkerProcess {
    /// Starts `llm-worker-rbee-cpu` at log level info, without an API token from the
    /// environment; `configure` adds the arguments and anything else.
    pub fn start(configure: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_llm-worker-rbee-cpu"));
        command
            .env("RUST_LOG", "info")
            .env_remove("LLORCH_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().expect("start the worker binary");
        let (lines_tx, lines) = mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[worker] {line}");
                let _ = lines_tx.send(line);
            }
        });
        Self { child, lines }
    }

    /// Reads stderr lines until `found` picks one out, failing with `what` after `timeout`.
    pub fn wait_for_line<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut found: impl FnMut(String) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect(what);
            if let Some(t) = found(line) {
                return t;
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
    }

    /// Waits for the worker to exit.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
