//! The network holder: a container per application that owns its network namespace, which
//! the application's container joins (`network_mode: container:<holder>`).
//!
//! Why: most of `docker start` is building a network namespace (Docker's own sandbox: the
//! namespace, its veth, addresses, hosts and resolv.conf files). On this project's machine
//! that was 300-400 ms of a start, against 120-160 ms to start a container that joins an
//! existing namespace. A move prepares the target's holder during the pre-copy, while the
//! application still runs on the source, so the start inside the move's pause is the short
//! one. The holder never sees a volume: starting it early gives the target nothing it may
//! not have yet.
//!
//! What lives on the holder is what Docker ties to the network namespace and refuses on a
//! container that joins another's: the hostname and domain name, DNS settings, extra hosts,
//! exposed ports, and `net.*` sysctls. The application's container keeps everything else.
//! Its address is the holder's, and it stays the same across the application's restarts.
//!
//! The holder's process is a 129-byte static program that calls `pause()` forever (built
//! here, [`pause_program`]), in an image the agent imports itself ([`image_tar`]): no
//! registry is needed, and nothing of the application's image is assumed. As PID 1 of its
//! namespace it ignores SIGTERM, so its stop signal is SIGKILL: it has nothing to flush.
//! Only x86-64 has the program; elsewhere the agent starts containers with their own
//! namespace, as before ([`supported`]).

use std::collections::HashMap;

use bollard::container::Config;
use bollard::models::{HostConfig, RestartPolicy as DockerRestart, RestartPolicyNameEnum};
use flocker_wire::ContainerSettings;

/// The holder's image, imported by the agent on first use.
pub const IMAGE: &str = "flocker/netns-holder:1";
/// On a holder: the name of the application container that joins it.
pub const LABEL_HOLDS: &str = "flocker.netns-of";
/// On an application container: the holder whose namespace it joins.
pub const LABEL_HOLDER: &str = "flocker.netns";

/// A holder without its application container this long is an orphan (a holder is created
/// just before its container, so a younger one may be in the middle of a create).
pub const ORPHAN_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// How long after its application's container stopped a holder is removed: past a move's
/// pause (its final push and start), which the namespace's teardown would slow down.
pub const REMOVAL_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether this build can run holders (the pause program exists for this architecture).
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64")
}

/// The holder of the application container `container`.
pub fn holder_name(container: &str) -> String {
    format!("{container}.netns")
}

/// A static x86-64 Linux executable (ELF64, one loadable segment) whose code is
/// `loop { pause() }`: `mov eax, 34; syscall; jmp back`.
pub fn pause_program() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADER: u64 = 64;
    const PROGRAM_HEADER: u64 = 56;
    const CODE: [u8; 9] = [
        0xb8, 0x22, 0x00, 0x00, 0x00, // mov eax, 34 (pause)
        0x0f, 0x05, // syscall
        0xeb, 0xf7, // jmp -9 (back to the mov)
    ];
    let code_at = HEADER + PROGRAM_HEADER;
    let size = code_at + CODE.len() as u64;
    let mut elf = Vec::with_capacity(size as usize);
    // ELF header: magic, 64-bit, little-endian, version 1, System V ABI, padding.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: executable
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(BASE + code_at).to_le_bytes()); // e_entry
    elf.extend_from_slice(&HEADER.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(HEADER as u16).to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&(PROGRAM_HEADER as u16).to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    // The one program header: load the whole file at BASE, readable and executable.
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(&CODE);
    elf
}

/// A root filesystem tar (ustar) holding only `/pause` (mode 0755), for `docker import`.
pub fn image_tar() -> Vec<u8> {
    let program = pause_program();
    let mut header = [0u8; 512];
    let field = |header: &mut [u8; 512], at: usize, value: &[u8]| {
        header[at..at + value.len()].copy_from_slice(value);
    };
    field(&mut header, 0, b"pause");
    field(&mut header, 100, b"0000755\0");
    field(&mut header, 108, b"0000000\0");
    field(&mut header, 116, b"0000000\0");
    field(
        &mut header,
        124,
        format!("{:011o}\0", program.len()).as_bytes(),
    );
    field(&mut header, 136, b"00000000000\0");
    field(&mut header, 156, b"0");
    field(&mut header, 257, b"ustar\0");
    field(&mut header, 263, b"00");
    // The checksum is the sum of the header's bytes with its own field read as spaces.
    field(&mut header, 148, b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    field(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut tar = header.to_vec();
    tar.extend_from_slice(&program);
    tar.resize(tar.len().next_multiple_of(512), 0);
    // Two zero blocks end the archive.
    tar.extend_from_slice(&[0; 1024]);
    tar
}

/// Whether a sysctl belongs to the network namespace (and so to the holder).
fn is_network_sysctl(name: &str) -> bool {
    name.starts_with("net.")
}

/// The holder's Docker config for the application container `container` with `settings`,
/// `labels` (the agent's managed and node labels) and the exposed ports as Docker names
/// them (`6379/tcp`).
pub fn holder_config(
    container: &str,
    settings: &ContainerSettings,
    mut labels: HashMap<String, String>,
    exposed_ports: HashMap<String, HashMap<(), ()>>,
) -> Config<String> {
    labels.insert(LABEL_HOLDS.to_string(), container.to_string());
    let net_sysctls: HashMap<String, String> = settings
        .sysctls
        .iter()
        .filter(|(name, _)| is_network_sysctl(name))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let list = |values: &Vec<String>| (!values.is_empty()).then(|| values.clone());
    Config {
        image: Some(IMAGE.to_string()),
        entrypoint: Some(vec!["/pause".to_string()]),
        labels: Some(labels),
        hostname: settings.hostname.clone(),
        domainname: settings.domainname.clone(),
        exposed_ports: Some(exposed_ports),
        // PID 1 of its namespace ignores SIGTERM; it holds no data.
        stop_signal: Some("SIGKILL".to_string()),
        host_config: Some(HostConfig {
            extra_hosts: list(&settings.extra_hosts),
            dns: list(&settings.dns),
            dns_search: list(&settings.dns_search),
            dns_options: list(&settings.dns_opt),
            sysctls: (!net_sysctls.is_empty()).then_some(net_sysctls),
            // The agent starts it, never Docker on its own (see `DockerRuntime::create`).
            restart_policy: Some(DockerRestart {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Takes from the application container's config what lives on the holder, and makes it
/// join `holder`'s namespace.
pub fn join_holder(config: &mut Config<String>, holder: &str) {
    config.hostname = None;
    config.domainname = None;
    config.exposed_ports = None;
    if let Some(host) = config.host_config.as_mut() {
        host.network_mode = Some(format!("container:{holder}"));
        host.extra_hosts = None;
        host.dns = None;
        host.dns_search = None;
        host.dns_options = None;
        if let Some(sysctls) = host.sysctls.as_mut() {
            sysctls.retain(|name, _| !is_network_sysctl(name));
        }
        if host.sysctls.as_ref().is_some_and(HashMap::is_empty) {
            host.sysctls = None;
        }
    }
    config
        .labels
        .get_or_insert_with(HashMap::new)
        .insert(LABEL_HOLDER.to_string(), holder.to_string());
}

/// How long a create waits for IPv6 addresses to leave duplicate address detection (see
/// [`has_tentative_global_ipv6`]).
pub const ADDRESS_SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `/proc/.../net/if_inet6` (`address ifindex prefixlen scope flags name`, in hex)
/// lists a global address (scope 0) that is still tentative (`IFA_F_TENTATIVE`, 0x40): the
/// kernel answers no neighbour solicitation for it yet. The bridge's gateway address is one
/// when the node's first container joins the bridge (a bridge without ports has no carrier,
/// so its addresses wait for it), and a container's replies to IPv6 clients then wait one
/// to two seconds in its neighbour queue. Link-local addresses do not matter, nor one whose
/// detection failed (`IFA_F_DADFAILED`, 0x08: it stays tentative for good).
pub fn has_tentative_global_ipv6(if_inet6: &str) -> bool {
    const TENTATIVE: u32 = 0x40;
    const DAD_FAILED: u32 = 0x08;
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let hex = |i: usize| fields.get(i).and_then(|f| u32::from_str_radix(f, 16).ok());
        hex(3) == Some(0)
            && hex(4).is_some_and(|flags| flags & TENTATIVE != 0 && flags & DAD_FAILED == 0)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use flocker_wire::{Application, Image, RestartPolicy};

    use super::*;

    #[test]
    fn the_holder_program_runs_and_waits_until_killed() {
        if !supported() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pause");
        {
            let mut f = std::fs::File::create(&path).expect("create");
            f.write_all(&pause_program()).expect("write");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut child = std::process::Command::new(&path).spawn().expect("exec");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the pause program exited on its own"
        );
        child.kill().expect("kill");
        let status = child.wait().expect("wait");
        assert!(!status.success());
    }

    #[test]
    fn the_image_tar_holds_the_program_with_a_valid_checksum() {
        let tar = image_tar();
        assert_eq!(tar.len() % 512, 0);
        let header = &tar[..512];
        assert_eq!(&header[..6], b"pause\0");
        let size = usize::from_str_radix(
            std::str::from_utf8(&header[124..135]).expect("ascii size"),
            8,
        )
        .expect("octal size");
        assert_eq!(&tar[512..512 + size], pause_program().as_slice());
        let stored = u32::from_str_radix(
            std::str::from_utf8(&header[148..154]).expect("ascii checksum"),
            8,
        )
        .expect("octal checksum");
        let computed: u32 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        assert_eq!(stored, computed);
        assert!(tar[tar.len() - 1024..].iter().all(|&b| b == 0));
    }

    fn app() -> Application {
        let mut app = Application {
            name: "db".into(),
            image: Image {
                repository: "redis".into(),
                tag: "7".into(),
            },
            ports: Vec::new(),
            volumes: Default::default(),
            volume: None,
            environment: BTreeMap::new(),
            links: Vec::new(),
            mem_limit: None,
            cpu_shares: None,
            restart_policy: RestartPolicy::Always,
            container: Default::default(),
            depends_on: Vec::new(),
            files: Vec::new(),
            health_check: None,
        };
        app.container.hostname = Some("db-host".into());
        app.container.dns = vec!["198.18.0.53".into()];
        app.container.extra_hosts = vec!["a:198.18.0.9".into()];
        app.container.sysctls = BTreeMap::from([
            ("net.core.somaxconn".to_string(), "1024".to_string()),
            ("kernel.shmmax".to_string(), "65536".to_string()),
        ]);
        app
    }

    #[test]
    fn namespace_settings_go_to_the_holder_and_the_rest_stays() {
        let app = app();
        let ports = HashMap::from([("6379/tcp".to_string(), HashMap::new())]);
        let holder = holder_config("flocker-db", &app.container, HashMap::new(), ports.clone());
        assert_eq!(holder.hostname.as_deref(), Some("db-host"));
        assert_eq!(holder.exposed_ports.as_ref(), Some(&ports));
        assert_eq!(
            holder.labels.as_ref().and_then(|l| l.get(LABEL_HOLDS)),
            Some(&"flocker-db".to_string())
        );
        let host = holder.host_config.expect("host config");
        assert_eq!(host.dns, Some(vec!["198.18.0.53".to_string()]));
        assert_eq!(host.extra_hosts, Some(vec!["a:198.18.0.9".to_string()]));
        let sysctls = host.sysctls.expect("sysctls");
        assert!(sysctls.contains_key("net.core.somaxconn"));
        assert!(!sysctls.contains_key("kernel.shmmax"));

        let mut config = Config {
            hostname: Some("db-host".to_string()),
            exposed_ports: Some(ports),
            host_config: Some(HostConfig {
                dns: Some(vec!["198.18.0.53".to_string()]),
                sysctls: Some(app.container.sysctls.clone().into_iter().collect()),
                memory: Some(1 << 30),
                ..Default::default()
            }),
            ..Default::default()
        };
        join_holder(&mut config, "flocker-db.netns");
        assert_eq!(config.hostname, None);
        assert_eq!(config.exposed_ports, None);
        let host = config.host_config.expect("host config");
        assert_eq!(
            host.network_mode.as_deref(),
            Some("container:flocker-db.netns")
        );
        assert_eq!(host.dns, None);
        assert_eq!(host.memory, Some(1 << 30));
        let sysctls = host.sysctls.expect("sysctls");
        assert_eq!(sysctls.len(), 1);
        assert!(sysctls.contains_key("kernel.shmmax"));
        assert_eq!(
            config.labels.and_then(|l| l.get(LABEL_HOLDER).cloned()),
            Some("flocker-db.netns".to_string())
        );
    }

    #[test]
    fn only_a_tentative_global_address_is_waited_for() {
        let settled = "00000000000000000000000000000001 01 80 10 80       lo\n\
                       fd001900000200000000000000000001 03 40 00 80  docker0\n";
        assert!(!has_tentative_global_ipv6(settled));
        let tentative_link_local = "fe800000000000000000000000000001 03 40 20 40  docker0\n";
        assert!(!has_tentative_global_ipv6(tentative_link_local));
        let tentative_global = "fd001900000200000000000000000001 03 40 00 40  docker0\n";
        assert!(has_tentative_global_ipv6(tentative_global));
        let failed = "fd001900000200000000000000000001 03 40 00 48  docker0\n";
        assert!(!has_tentative_global_ipv6(failed));
        assert!(!has_tentative_global_ipv6(""));
        assert!(!has_tentative_global_ipv6("garbage\n"));
    }
}
