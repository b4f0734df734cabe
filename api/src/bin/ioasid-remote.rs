//! `ioasid-remote`: the command-line client of the ioasid-vmm REST API (Cloud Hypervisor's
//! `ch-remote`, for the endpoints we implement). Prints the reply's JSON body on stdout;
//! on an error prints the server's message and its causes on stderr and exits with status 1.

use std::os::fd::{BorrowedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use api::client::{ApiClient, ClientResponse};
use api::routes::HttpMethod;
use api::{DeviceConfig, VmConfig, VmRemoveDevice};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ioasid-remote",
    version,
    about = "Control a running ioasid-vmm"
)]
struct Cli {
    /// The VMM's API socket (its --api-socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the VM from a Cloud Hypervisor `VmConfig` JSON file (`-` reads stdin); boot it
    /// with `boot`.
    Create {
        /// The JSON file.
        path: PathBuf,
    },
    /// Boot the created (or shut down) VM.
    Boot,
    /// Pause the running VM.
    Pause,
    /// Resume the paused VM.
    Resume,
    /// Reboot the VM (shut down, then boot with the same configuration).
    Reboot,
    /// Shut the VM down (if it runs) and forget its configuration.
    Delete,
    /// Hot-add a passthrough device.
    #[command(after_help = DeviceConfig::SYNTAX)]
    AddDevice {
        /// key=value list: path=...,iommu=on,pasid=on,id=...,pci_segment=..,pci_device_id=..;
        /// fd=N sends this process's fd N with SCM_RIGHTS instead of a path.
        config: String,
    },
    /// Hot-remove a device by id.
    RemoveDevice {
        /// Device id.
        id: String,
    },
    /// VM information.
    Info,
    /// IOMMU backend and per-device capabilities.
    Iommu,
    /// IOASes, HWPTs and attachments.
    Ioasids,
    /// Guest-PASID to host-PASID table.
    Pasids,
    /// Fault, page-request, invalidation and ioctl counters.
    Counters,
    /// Check that the VMM answers.
    Ping,
    /// Shut the VM down; the VMM keeps serving, and `boot` boots it again.
    Shutdown,
    /// Shut the VM down and end the VMM.
    ShutdownVmm,
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table; any integer is a valid argument.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn run(cli: Cli) -> Result<ClientResponse, String> {
    let client = ApiClient::new(&cli.api_socket);
    let send = |method, endpoint, body: Option<Vec<u8>>, fds: &[BorrowedFd<'_>]| {
        client
            .request(method, endpoint, body.as_deref(), fds)
            .map_err(|e| error_chain(&e))
    };
    match cli.command {
        Command::Ping => send(HttpMethod::Get, "vmm.ping", None, &[]),
        Command::Info => send(HttpMethod::Get, "vm.info", None, &[]),
        Command::Iommu => send(HttpMethod::Get, "vm.iommu", None, &[]),
        Command::Ioasids => send(HttpMethod::Get, "vm.ioasids", None, &[]),
        Command::Pasids => send(HttpMethod::Get, "vm.pasids", None, &[]),
        Command::Counters => send(HttpMethod::Get, "vm.counters", None, &[]),
        Command::Shutdown => send(HttpMethod::Put, "vm.shutdown", None, &[]),
        Command::ShutdownVmm => send(HttpMethod::Put, "vmm.shutdown", None, &[]),
        Command::Boot => send(HttpMethod::Put, "vm.boot", None, &[]),
        Command::Pause => send(HttpMethod::Put, "vm.pause", None, &[]),
        Command::Resume => send(HttpMethod::Put, "vm.resume", None, &[]),
        Command::Reboot => send(HttpMethod::Put, "vm.reboot", None, &[]),
        Command::Delete => send(HttpMethod::Put, "vm.delete", None, &[]),
        Command::Create { path } => {
            let body = if path.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .map_err(|e| format!("Cannot read the VmConfig from stdin: {e}"))?;
                b
            } else {
                std::fs::read(&path).map_err(|e| format!("Cannot read {}: {e}", path.display()))?
            };
            // Checked here too, so a typo is reported before anything is sent.
            VmConfig::from_json(&body)
                .map_err(|e| format!("Invalid VmConfig in {}: {e}", path.display()))?;
            send(HttpMethod::Put, "vm.create", Some(body), &[])
        }
        Command::RemoveDevice { id } => {
            let body = serde_json::to_vec(&VmRemoveDevice { id }).map_err(|e| e.to_string())?;
            send(HttpMethod::Put, "vm.remove-device", Some(body), &[])
        }
        Command::AddDevice { config } => {
            let cfg = DeviceConfig::parse(&config).map_err(|e| e.to_string())?;
            cfg.validate().map_err(|e| e.to_string())?;
            let body = serde_json::to_vec(&cfg).map_err(|e| e.to_string())?;
            match cfg.fd {
                None => send(HttpMethod::Put, "vm.add-device", Some(body), &[]),
                Some(fd) => {
                    if !fd_is_open(fd) {
                        return Err(format!("fd={fd} is not an open file descriptor"));
                    }
                    // SAFETY: `fd` is open (checked above) and stays open until this process
                    // exits; the borrow ends when `send` returns.
                    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                    send(HttpMethod::Put, "vm.add-device", Some(body), &[borrowed])
                }
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(resp) if resp.is_success() => {
            if !resp.body.is_empty() {
                match resp.json() {
                    Ok(v) => println!(
                        "{}",
                        serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
                    ),
                    Err(_) => println!("{}", String::from_utf8_lossy(&resp.body)),
                }
            }
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            let mut messages = resp.error_messages().into_iter();
            eprintln!(
                "Error {}: {}",
                resp.status,
                messages.next().unwrap_or_default()
            );
            for cause in messages {
                eprintln!("  Caused by: {cause}");
            }
            ExitCode::FAILURE
        }
        Err(msg) => {
            eprintln!("Error: {msg}");
            ExitCode::FAILURE
        }
    }
}
