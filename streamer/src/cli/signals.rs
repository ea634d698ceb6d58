//! SIGINT/SIGTERM: cut the connection so the pipeline fails through its normal error path,
//! which aborts the sink (kills `zfs recv`, removes staging) before the process exits.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Set once a signal arrived.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a signal cut the transfer.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The connection to cut; empty until connected, so a signal before that just exits.
#[derive(Clone, Default)]
pub struct Guard(Arc<Mutex<Option<TcpStream>>>);

impl Guard {
    /// Installs the handler thread.
    pub fn install() -> std::io::Result<Self> {
        let guard = Self::default();
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let shared = guard.clone();
        std::thread::spawn(move || {
            for sig in signals.forever() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                let conn = shared.0.lock().ok().and_then(|mut c| c.take());
                match conn {
                    Some(tcp) => {
                        eprintln!("flocker-stream: signal {sig}: aborting the transfer");
                        let _ = tcp.shutdown(Shutdown::Both);
                    }
                    None => std::process::exit(128 + sig),
                }
            }
        });
        Ok(guard)
    }

    /// Arms the guard with (a handle to) the connection's socket.
    pub fn arm(&self, tcp: &TcpStream) {
        if let (Ok(clone), Ok(mut slot)) = (tcp.try_clone(), self.0.lock()) {
            *slot = Some(clone);
        }
    }
}
