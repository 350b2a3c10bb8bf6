# The sandbox as a microvm.nix guest (NixOS only; needs microvm's guest module,
# which the flake's nixosModules.sandbox and microvm's host module import).
# Hypervisor, store sharing, memory and network come from
# nix/lib/realize.nix's microvmFor, so they can be checked without nixpkgs.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  corral = import ../../lib;
  cfg = config.corral.sandbox;
  t = cfg.normalized;
  vm = corral.microvmFor t { inherit (cfg) hypervisor; };
  inherit (t) user;
  isRoot = user.uid == 0;
  # PATH is the image's layout (/usr/bin); NixOS keeps its own.
  env = removeAttrs t.env [ "PATH" ];
in
{
  config = {
    assertions = [
      {
        assertion = builtins.elem "microvm" t.isolation;
        message = "template '${t.name}' does not allow isolation 'microvm' (it allows: ${lib.concatStringsSep ", " t.isolation})";
      }
      {
        assertion = vm.unsharedMounts == [ ];
        message = "template '${t.name}' mounts host paths, which ${cfg.hypervisor} cannot share; use cloud-hypervisor or qemu";
      }
    ];

    # Above mkDefault: microvm.nix's host module sets the VM's name with mkDefault.
    networking.hostName = lib.mkOverride 900 (corral.hostName t);

    microvm = {
      inherit (vm)
        hypervisor
        vcpu
        mem
        shares
        volumes
        interfaces
        storeOnDisk
        ;
    }
    // lib.optionalAttrs vm.storeOnDisk { inherit (vm) storeDiskType; };

    users.mutableUsers = false;
    users.users = lib.mkIf (!isRoot) {
      ${user.name} = {
        isNormalUser = true;
        inherit (user) uid;
        group = user.name;
        home = "/home/${user.name}";
      };
    };
    users.groups = lib.mkIf (!isRoot) { ${user.name}.gid = user.gid; };

    environment.systemPackages = cfg.resolvedPackages;
    environment.variables = env;

    # Ephemeral sandboxes: the workdir is a tmpfs of the template's disk size.
    fileSystems = lib.mkIf (t.kind == "ephemeral") {
      ${t.workdir} = {
        device = "tmpfs";
        fsType = "tmpfs";
        options = [
          "size=${toString t.resources.disk}"
          "mode=0755"
          "uid=${toString user.uid}"
          "gid=${toString user.gid}"
        ];
      };
    };
    systemd.tmpfiles.rules = [ "d ${t.workdir} 0755 ${toString user.uid} ${toString user.gid} -" ];

    system.activationScripts.corral-files = lib.stringAfter [ "users" ] (
      lib.concatMapStrings (f: ''
        install -D -m ${f.mode} ${pkgs.writeText "corral-file" f.content} ${lib.escapeShellArg f.path}
      '') t.files
    );

    # Sandbox work runs in one slice with the template's process limit (the
    # host caps CPU and memory on the microvm@ unit and the VM itself).
    systemd.slices.corral = {
      description = "Corral sandbox workloads";
      sliceConfig.TasksMax = t.resources.pids;
    };
    systemd.services = lib.mapAttrs' (
      name: s:
      lib.nameValuePair "corral-${name}" {
        inherit (s) description script;
        wantedBy = [ "multi-user.target" ];
        environment = env;
        path = cfg.resolvedPackages;
        serviceConfig = {
          User = user.name;
          WorkingDirectory = t.workdir;
          Slice = "corral.slice";
          Restart = "on-failure";
        };
      }
    ) cfg.services;

    # network = "none": no interface at all; "egress": DHCP from the host's bridge.
    networking.useNetworkd = true;
    networking.useDHCP = false;
    systemd.network.networks."10-corral-uplink" = lib.mkIf (t.network == "egress") {
      matchConfig.MACAddress = (builtins.head vm.interfaces).mac;
      networkConfig.DHCP = "ipv4";
    };

    services.openssh.enable = lib.mkDefault false;
    documentation.enable = lib.mkDefault false;
    system.stateVersion = lib.mkDefault lib.trivial.release;
  };
}
