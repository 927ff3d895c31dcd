//! The Pod Security Standards' `restricted` profile (which includes `baseline`), as
//! published for Kubernetes 1.33 (kubernetes.io/docs/concepts/security/pod-security-standards),
//! checked field by field. `containers` limits the check to some containers (the injected
//! ones of an app's pod, whose other fields are the app's), in which case the pod-level
//! fields that could make them pass are not counted: those containers must pass alone.

use k8s_openapi::api::core::v1::{Container, PodSpec, SecurityContext};

const BASELINE_CAPS: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
const SAFE_SYSCTLS: [&str; 9] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
];
const SELINUX_TYPES: [&str; 3] = ["container_t", "container_init_t", "container_kvm_t"];

/// Every violation of `restricted`, described; empty when the pod (or the named containers)
/// pass.
pub fn restricted_violations(spec: &PodSpec, containers: Option<&[&str]>) -> Vec<String> {
    let mut v = Vec::new();
    let pod_level = containers.is_none();
    let psc = spec.security_context.clone().unwrap_or_default();
    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .chain(std::iter::empty())
        .filter(|c| containers.is_none_or(|names| names.contains(&c.name.as_str())))
        .collect();
    if let Some(names) = containers {
        for n in names {
            if !all.iter().any(|c| c.name == *n) {
                v.push(format!("no container named {n}"));
            }
        }
    }

    if pod_level {
        // Baseline: host namespaces, HostProcess, hostPath volumes, sysctls, SELinux, AppArmor.
        for (set, what) in [
            (spec.host_network, "hostNetwork"),
            (spec.host_pid, "hostPID"),
            (spec.host_ipc, "hostIPC"),
        ] {
            if set == Some(true) {
                v.push(format!("pod: {what} must not be true"));
            }
        }
        if psc
            .windows_options
            .as_ref()
            .and_then(|w| w.host_process)
            .unwrap_or(false)
        {
            v.push("pod: hostProcess must not be true".into());
        }
        for s in psc.sysctls.iter().flatten() {
            if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
                v.push(format!("pod: sysctl {} is not in the safe set", s.name));
            }
        }
        if let Some(se) = &psc.se_linux_options {
            selinux(
                &mut v,
                "pod",
                se.type_.as_deref(),
                se.user.as_deref(),
                se.role.as_deref(),
            );
        }
        if let Some(a) = &psc.app_armor_profile
            && a.type_ != "RuntimeDefault"
            && a.type_ != "Localhost"
        {
            v.push(format!("pod: AppArmor profile {} is not allowed", a.type_));
        }
        if let Some(s) = &psc.seccomp_profile
            && s.type_ != "RuntimeDefault"
            && s.type_ != "Localhost"
        {
            v.push(format!("pod: seccomp profile {} is not allowed", s.type_));
        }
        if psc.run_as_user == Some(0) {
            v.push("pod: runAsUser must not be 0".into());
        }
    }
    // Restricted: volume types (only the pod's volumes our containers mount, when limited).
    let mounted: Vec<&str> = all
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten().map(|m| m.name.as_str()))
        .collect();
    for vol in spec.volumes.iter().flatten() {
        if !pod_level && !mounted.contains(&vol.name.as_str()) {
            continue;
        }
        let allowed = vol.config_map.is_some()
            || vol.csi.is_some()
            || vol.downward_api.is_some()
            || vol.empty_dir.is_some()
            || vol.ephemeral.is_some()
            || vol.persistent_volume_claim.is_some()
            || vol.projected.is_some()
            || vol.secret.is_some();
        if !allowed {
            v.push(format!(
                "volume {}: type not allowed (hostPath and others)",
                vol.name
            ));
        }
    }

    for c in all {
        let at = format!("container {}", c.name);
        let sc: SecurityContext = c.security_context.clone().unwrap_or_default();
        // Baseline.
        if sc.privileged == Some(true) {
            v.push(format!("{at}: privileged must not be true"));
        }
        if sc
            .windows_options
            .as_ref()
            .and_then(|w| w.host_process)
            .unwrap_or(false)
        {
            v.push(format!("{at}: hostProcess must not be true"));
        }
        for p in c.ports.iter().flatten() {
            if p.host_port.unwrap_or(0) != 0 {
                v.push(format!("{at}: hostPort must be unset or 0"));
            }
        }
        if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
            v.push(format!("{at}: procMount must be Default"));
        }
        if let Some(se) = &sc.se_linux_options {
            selinux(
                &mut v,
                &at,
                se.type_.as_deref(),
                se.user.as_deref(),
                se.role.as_deref(),
            );
        }
        if let Some(a) = &sc.app_armor_profile
            && a.type_ != "RuntimeDefault"
            && a.type_ != "Localhost"
        {
            v.push(format!("{at}: AppArmor profile {} is not allowed", a.type_));
        }
        // Restricted.
        if sc.allow_privilege_escalation != Some(false) {
            v.push(format!("{at}: allowPrivilegeEscalation must be false"));
        }
        let non_root = sc
            .run_as_non_root
            .or(if pod_level { psc.run_as_non_root } else { None });
        if non_root != Some(true) {
            v.push(format!("{at}: runAsNonRoot must be true"));
        }
        if sc.run_as_user == Some(0) {
            v.push(format!("{at}: runAsUser must not be 0"));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|s| s.type_.clone())
            .or(if pod_level {
                psc.seccomp_profile.as_ref().map(|s| s.type_.clone())
            } else {
                None
            });
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
            v.push(format!(
                "{at}: seccompProfile must be RuntimeDefault or Localhost"
            ));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.iter().flatten().any(|d| d == "ALL") {
            v.push(format!("{at}: capabilities must drop ALL"));
        }
        for add in caps.add.iter().flatten() {
            if add != "NET_BIND_SERVICE" {
                v.push(format!("{at}: capability {add} may not be added"));
            }
            if !BASELINE_CAPS.contains(&add.as_str()) {
                v.push(format!(
                    "{at}: capability {add} is outside the baseline set"
                ));
            }
        }
    }
    v
}

fn selinux(v: &mut Vec<String>, at: &str, t: Option<&str>, user: Option<&str>, role: Option<&str>) {
    if let Some(t) = t
        && !SELINUX_TYPES.contains(&t)
    {
        v.push(format!("{at}: SELinux type {t} is not allowed"));
    }
    if user.is_some() || role.is_some() {
        v.push(format!("{at}: SELinux user and role must be unset"));
    }
}
