# From a normalized template to what the Nix outputs need: the OCI image config,
# the microVM settings (hypervisor, store sharing, memory, network) and the
# nixpkgs packages. Plain data only, so all of it evaluates without nixpkgs; the
# modules under nix/modules/ turn it into derivations.
let
  inherit (builtins)
    attrNames
    ceil
    concatMap
    concatStringsSep
    filter
    hashString
    length
    map
    match
    removeAttrs
    replaceStrings
    substring
    toJSON
    ;

  mib = 1048576;
  ceilDiv = n: d: (n + d - 1) / d;

  # corral.spec.template.Template.image_key(), where Nix's JSON equals Python's
  # json.dumps(..., sort_keys=True, separators=(",", ":")): keys sorted, and every
  # string printable ASCII (Python escapes other characters differently). null otherwise.
  imageKey =
    t:
    let
      blob = toJSON (
        removeAttrs t [
          "name"
          "description"
          "resources"
          "timeout"
          "kind"
          "service"
          "volume"
        ]
        // (if t.volume == null then { } else { volume_path = t.volume.path; })
      );
      comparable = match "[ -~]*" blob != null && match ".*\\\\u000[8c].*" blob == null;
    in
    if comparable then hashString "sha256" blob else null;

  # Mounts a guest can get at build time: optional ones depend on the host they
  # run on and `@rust-sysroot` is resolved by the Python runtime, so neither is
  # shared into a microVM (give the guest the tools as packages instead).
  sharedMounts = t: filter (m: !m.optional && substring 0 1 m.source != "@") t.mounts;

  # firecracker boots fastest but shares no directories; cloud-hypervisor has
  # virtiofs for host mounts; qemu (9p, savevm, hotplug) for long-lived guests.
  hypervisorFor =
    t:
    if t.kind == "persistent" then
      "qemu"
    else if sharedMounts t != [ ] then
      "cloud-hypervisor"
    else
      "firecracker";

  # The protocol a hypervisor shares directories with in microvm.nix, or null.
  shareProtocol =
    hypervisor:
    {
      qemu = "9p";
      cloud-hypervisor = "virtiofs";
    }
    .${hypervisor} or null;

  # Interface names are at most 15 bytes (IFNAMSIZ); the hash keeps them unique.
  tapName = t: "crl" + substring 0 12 (hashString "sha256" t.name);
  macAddress =
    t:
    let
      h = hashString "sha256" "mac:${t.name}";
      byte = i: substring (2 * i) 2 h;
    in
    # 02: locally administered, unicast
    concatStringsSep ":" ([ "02" ] ++ map byte [ 0 1 2 3 4 ]);

  hostName = t: replaceStrings [ "_" "." ] [ "-" "-" ] "sandbox-${t.name}";

  # microvm.nix guest settings (the `microvm` option set) for template `t`.
  microvmFor =
    t:
    {
      hypervisor ? hypervisorFor t,
    }:
    let
      protocol = shareProtocol hypervisor;
      mounts = sharedMounts t;
      indexed = builtins.genList (i: {
        inherit i;
        m = builtins.elemAt mounts i;
      }) (length mounts);
    in
    {
      inherit hypervisor;
      # microVMs get whole vCPUs; the host caps the fraction with CPUQuota.
      vcpu = if t.resources.vcpus < 1 then 1 else ceil t.resources.vcpus;
      cpuQuotaPercent = ceil (t.resources.vcpus * 100);
      # A NixOS guest does not boot in less than 256 MiB.
      mem =
        let
          wanted = ceilDiv t.resources.memory mib;
        in
        if wanted < 256 then 256 else wanted;
      # The host's /nix/store read-only where the hypervisor can share it; else
      # (firecracker) an erofs image of the guest's closure.
      storeOnDisk = protocol == null;
      storeDiskType = "erofs";
      shares =
        if protocol == null then
          [ ]
        else
          [
            {
              tag = "ro-store";
              source = "/nix/store";
              mountPoint = "/nix/.ro-store";
              proto = protocol;
              readOnly = true;
            }
          ]
          ++ map (x: {
            tag = "mount${toString x.i}";
            source = x.m.source;
            mountPoint = x.m.target;
            proto = protocol;
            readOnly = true;
          }) indexed;
      unsharedMounts = if protocol == null then mounts else [ ];
      # Persistent sandboxes keep their workdir on a volume; ephemeral ones get a
      # tmpfs of the template's disk size, charged to the guest's memory.
      volumes =
        if t.kind == "persistent" then
          [
            {
              image = "${t.name}-work.img";
              mountPoint = t.workdir;
              size = ceilDiv t.resources.disk mib;
            }
          ]
        else
          [ ];
      interfaces =
        if t.network == "egress" then
          [
            {
              type = "tap";
              id = tapName t;
              mac = macAddress t;
            }
          ]
        else
          [ ];
    };

  # The image config of `<name>-oci` (OCI image-spec "config" object).
  ociConfigFor = t: {
    Env = map (k: "${k}=${t.env.${k}}") (attrNames t.env);
    User = "${toString t.user.uid}:${toString t.user.gid}";
    WorkingDir = t.workdir;
    Labels = {
      "dev.corral.template" = t.name;
      "dev.corral.description" = t.description;
      "dev.corral.isolation" = concatStringsSep "," t.isolation;
      "dev.corral.network" = t.network;
      "dev.corral.kind" = t.kind;
    }
    // (if imageKey t == null then { } else { "dev.corral.image-key" = imageKey t; });
  };

  # Debian package names (a template's `packages`) to nixpkgs attribute paths;
  # a name missing here is looked up as the nixpkgs attribute of the same name.
  debianToNixpkgs = {
    "build-essential" = [
      "gcc"
      "gnumake"
      "binutils"
    ];
    "ca-certificates" = [ "cacert" ];
    "golang" = [ "go" ];
    "golang-go" = [ "go" ];
    "iproute2" = [ "iproute2" ];
    "libssl-dev" = [ "openssl.dev" ];
    "netcat-openbsd" = [ "netcat-openbsd" ];
    "nodejs" = [ "nodejs" ];
    "npm" = [ "nodejs" ];
    "openssh-client" = [ "openssh" ];
    "pkg-config" = [ "pkg-config" ];
    "python3" = [ "python3" ];
    "python3-pip" = [ "python3Packages.pip" ];
    "python3-venv" = [ "python3" ];
    "sqlite3" = [ "sqlite" ];
    "xz-utils" = [ "xz" ];
  };

  # The userland each base stands for in a Nix-built image: `host` binds the
  # host's /usr in the Python builder; here it is the same kind of tools from nixpkgs.
  baseNixpkgs = {
    host = [
      "bashInteractive"
      "coreutils"
      "findutils"
      "gnugrep"
      "gnused"
      "gawk"
      "gnutar"
      "gzip"
      "which"
      "less"
      "procps"
    ];
    busybox = [ "busybox" ];
    "debian:bookworm" = [
      "bashInteractive"
      "coreutils"
      "findutils"
      "gnugrep"
      "gnused"
      "gawk"
      "gnutar"
      "gzip"
      "cacert"
    ];
  };

  # nixpkgs attribute paths for template `t` plus `extra` (from nix/templates.nix).
  nixpkgsFor =
    t: extra:
    baseNixpkgs.${t.base} ++ concatMap (p: debianToNixpkgs.${p} or [ p ]) t.packages ++ extra;
in
{
  inherit
    imageKey
    sharedMounts
    hypervisorFor
    shareProtocol
    tapName
    macAddress
    hostName
    microvmFor
    ociConfigFor
    debianToNixpkgs
    baseNixpkgs
    nixpkgsFor
    ;
}
