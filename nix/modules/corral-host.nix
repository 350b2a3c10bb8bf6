# nixosModules.corral-host: a machine that runs Corral sandboxes.
#
#   services.corral.mode = "container": podman, crun, runc and gVisor (runsc),
#     cgroup v2, user namespaces; `corral serve` (the API) and `corral agent`
#     (this host's worker) as systemd units.
#   services.corral.mode = "microvm": all of that, plus KVM, microvm.nix's host
#     and a bridge for guests with network = "egress"; `sandboxes` are declared
#     as microVM guests.
#
# microvm.nix's host module must be imported for "microvm" mode; the flake's
# nixosModules.corral-host does that.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:
let
  cfg = config.services.corral;
  corral = import ../lib;
  inherit (lib) mkOption types;
  toml = pkgs.formats.toml { };
  microvmMode = cfg.mode == "microvm";
  haveMicrovmHost = options ? microvm && options.microvm ? vms;

  runtimePackages = [
    pkgs.crun
    pkgs.runc
    pkgs.gvisor
    pkgs.catatonit
    pkgs.podman
    pkgs.util-linux
  ];

  # Both daemons manage sandbox cgroups under their own unit (Delegate) and keep
  # many files open at once (one per sandbox pipe, socket and log).
  daemonConfig = {
    Type = "simple";
    Restart = "on-failure";
    RestartSec = "2s";
    Delegate = true;
    KillMode = "mixed";
    LimitNOFILE = cfg.limitNOFILE;
    StateDirectory = "corral";
    RuntimeDirectory = "corral";
  };
  daemonEnvironment = {
    CORRAL_CONFIG = "/etc/corral/config.toml";
    # no warm CLI command server inside a service
    CORRAL_CLI_SERVER = "0";
  };

  guestFor = name: entry: {
    config = {
      imports = [ ./sandbox.nix ];
      corral.sandbox.template = entry;
    };
    autostart = cfg.autostartSandboxes;
  };
in
{
  options.services.corral = {
    enable = lib.mkEnableOption "Corral sandboxes on this host";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../packages/corral.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/packages/corral.nix { }";
      description = "The corral package.";
    };

    mode = mkOption {
      type = types.enum [
        "container"
        "microvm"
      ];
      default = "container";
      description = ''
        "container": OCI runtimes and gVisor only (cloud VMs without nested KVM);
        "microvm": also KVM microVMs (bare metal).
      '';
    };

    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:7070";
      description = "Address of `corral serve`'s API.";
    };

    clientKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = ''
        SSH public keys of developers whose `corral` reaches the API through an SSH
        tunnel (user `corral`, no shell; see nix/hosts/dev-mac.nix).
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the API port (put TLS and authentication in front of it first).";
    };

    agent = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Run `corral agent`, this host's worker in a fleet (placement across hosts).
          The command arrives with the fleet work; a single host needs only `corral serve`.
        '';
      };
      server = mkOption {
        type = types.str;
        default = "http://${cfg.listen}";
        defaultText = lib.literalExpression ''"http://''${config.services.corral.listen}"'';
        description = "The `corral serve` the agent registers with.";
      };
    };

    settings = mkOption {
      type = toml.type;
      default = { };
      example = {
        oci.runtime = "runsc";
      };
      description = "Written to /etc/corral/config.toml (corral.config.Settings).";
    };

    limitNOFILE = mkOption {
      type = types.ints.positive;
      default = 1048576;
      description = "LimitNOFILE of the daemons (each sandbox gets 4096 of its own).";
    };

    maxUserNamespaces = mkOption {
      type = types.ints.positive;
      default = 65536;
      description = "user.max_user_namespaces: crun and runc give each sandbox one.";
    };

    sandboxes = mkOption {
      type = types.attrsOf types.path;
      default = lib.mapAttrs (_: e: e.path) corral.templates;
      defaultText = lib.literalMD "every template of nix/templates.nix";
      description = "Templates declared as microVM guests (\"microvm\" mode), by name.";
    };

    autostartSandboxes = mkOption {
      type = types.bool;
      default = false;
      description = "Boot the declared guests with the host (else `microvm -u`/the agent starts them).";
    };

    bridge = {
      name = mkOption {
        type = types.str;
        default = "corral0";
        description = "Bridge of the guests with network = \"egress\".";
      };
      address = mkOption {
        type = types.str;
        default = "10.88.0.1/16";
        description = "The host's address on the bridge (guests get DHCP leases from it).";
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = !microvmMode || haveMicrovmHost;
            message = "services.corral.mode = \"microvm\" needs microvm.nix's host module (import the flake's nixosModules.corral-host)";
          }
        ];

        services.corral.settings = {
          state_dir = lib.mkDefault "/var/lib/corral";
          backend = lib.mkDefault "oci";
          oci.runtime = lib.mkDefault "crun";
        };
        users.users.corral = {
          isSystemUser = true;
          group = "corral";
          # port forwarding only
          shell = "${pkgs.shadow}/bin/nologin";
          openssh.authorizedKeys.keys = map (k: "restrict,port-forwarding ${k}") cfg.clientKeys;
        };
        users.groups.corral = { };

        environment.etc."corral/config.toml".source = toml.generate "corral-config.toml" cfg.settings;
        environment.systemPackages = [ cfg.package ] ++ runtimePackages;

        # Containers: podman with crun by default and gVisor registered as runsc.
        virtualisation.podman.enable = true;
        virtualisation.containers.containersConf.settings.engine = {
          runtime = "crun";
          runtimes.runsc = [ "${pkgs.gvisor}/bin/runsc" ];
        };

        boot.kernel.sysctl = {
          "user.max_user_namespaces" = cfg.maxUserNamespaces;
          # templates may allow up to 4M processes
          "kernel.pid_max" = 4194304;
          "fs.inotify.max_user_instances" = 8192;
          "fs.inotify.max_user_watches" = 1048576;
        };

        systemd.services.corral-serve = {
          description = "Corral API (corral serve)";
          wantedBy = [ "multi-user.target" ];
          after = [ "network-online.target" ];
          wants = [ "network-online.target" ];
          path = runtimePackages;
          environment = daemonEnvironment;
          serviceConfig = daemonConfig // {
            ExecStart = "${lib.getExe cfg.package} serve --listen ${cfg.listen}";
          };
        };

        systemd.services.corral-agent = lib.mkIf cfg.agent.enable {
          description = "Corral host agent (corral agent)";
          wantedBy = [ "multi-user.target" ];
          after = [ "corral-serve.service" ];
          path = runtimePackages ++ lib.optional (microvmMode && haveMicrovmHost) pkgs.virtiofsd;
          environment = daemonEnvironment;
          serviceConfig = daemonConfig // {
            ExecStart = "${lib.getExe cfg.package} agent --server ${cfg.agent.server}";
          };
        };

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
          (lib.toInt (lib.last (lib.splitString ":" cfg.listen)))
        ];
      }

      # cgroup v2 only. NixOS 24.11 removed this option, as systemd 256 no longer
      # boots with cgroup v1: v2 is then the only hierarchy.
      (lib.optionalAttrs (lib.versionOlder lib.trivial.release "24.11") {
        systemd.enableUnifiedCgroupHierarchy = true;
      })

      (lib.mkIf microvmMode {
        boot.kernelModules = lib.optionals pkgs.stdenv.hostPlatform.isx86 [
          "kvm-intel"
          "kvm-amd"
        ];

        # Guests with network = "egress" get a tap on a NATed bridge; they may
        # not reach the host's networks or a cloud metadata service.
        systemd.network = {
          enable = true;
          netdevs."40-${cfg.bridge.name}".netdevConfig = {
            Name = cfg.bridge.name;
            Kind = "bridge";
          };
          networks."40-${cfg.bridge.name}" = {
            matchConfig.Name = cfg.bridge.name;
            address = [ cfg.bridge.address ];
            networkConfig = {
              DHCPServer = true;
              IPMasquerade = "ipv4";
              ConfigureWithoutCarrier = true;
            };
          };
          networks."41-corral-taps" = {
            matchConfig.Name = "crl*";
            networkConfig.Bridge = cfg.bridge.name;
          };
        };
        networking.nftables.enable = true;
        networking.firewall = {
          interfaces.${cfg.bridge.name}.allowedUDPPorts = [ 67 ];
          filterForward = true;
          extraForwardRules = ''
            iifname "${cfg.bridge.name}" ip daddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10 } drop
            iifname "${cfg.bridge.name}" accept
          '';
        };
      })

      (lib.optionalAttrs haveMicrovmHost {
        microvm.host.enable = microvmMode;
        microvm.vms = lib.mkIf microvmMode (lib.mapAttrs guestFor cfg.sandboxes);
        # Each guest's unit gets the template's CPU fraction and cpuset.
        systemd.services = lib.mkIf microvmMode (
          lib.mapAttrs' (
            name: path:
            let
              t = corral.readTemplate path;
              vm = corral.microvmFor t { };
            in
            lib.nameValuePair "microvm@${name}" {
              overrideStrategy = "asDropin";
              serviceConfig = {
                CPUQuota = "${toString vm.cpuQuotaPercent}%";
              }
              // lib.optionalAttrs (t.resources.cpuset != null) { AllowedCPUs = t.resources.cpuset; };
            }
          ) cfg.sandboxes
        );
      })
    ]
  );
}
