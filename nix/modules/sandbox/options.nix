# corral.sandbox: one sandbox template as module options. Point `template` at a
# template file and every option defaults to its normalized value; set or override
# options directly and `normalized` validates the result with Python's rules
# (nix/lib/template.nix), so a module can never build what `corral` would refuse.
#
# Works in NixOS and in a bare `lib.evalModules` (the flake's `<name>-oci` builds
# use the latter with `_module.args.pkgs`).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  corral = import ../../lib;
  registry = import ../../templates.nix;
  cfg = config.corral.sandbox;
  inherit (lib) mkOption types;

  fromFile = if cfg.template == null then corral.defaults else corral.readTemplate cfg.template;
  # An option whose default is the template's value for the same field.
  templateOption =
    attr: args:
    mkOption (
      {
        default = fromFile.${attr};
        defaultText = lib.literalMD "the template's `${attr}` (or Corral's default)";
        description = "The template's `${attr}` (see the README's Templates section).";
      }
      // args
    );

  size = types.coercedTo types.str (corral.parseSize "corral.sandbox.resources") types.ints.unsigned;

  fileType = types.submodule {
    options = {
      path = mkOption {
        type = types.str;
        description = "Absolute path inside the sandbox.";
      };
      content = mkOption {
        type = types.str;
        description = "The file's content.";
      };
      mode = mkOption {
        type = types.str;
        default = "0644";
        description = "Octal file mode.";
      };
    };
  };

  mountType = types.submodule {
    options = {
      source = mkOption {
        type = types.str;
        description = "Host path, or `@rust-sysroot`.";
      };
      target = mkOption {
        type = types.str;
        description = "Path inside the sandbox (read-only).";
      };
      optional = mkOption {
        type = types.bool;
        default = false;
        description = "Skip the mount when the source does not exist.";
      };
    };
  };

  serviceType = types.submodule {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
        description = "What the service is for.";
      };
      script = mkOption {
        type = types.lines;
        description = "Shell script run as the sandbox user in the workdir.";
      };
    };
  };

  resolve =
    path:
    lib.attrByPath (lib.splitString "." path) (throw (
      "corral.sandbox '${cfg.name}': nixpkgs has no package '${path}'; map the Debian "
      + "package in nix/lib/realize.nix (debianToNixpkgs) or set corral.sandbox.nixpkgs"
    )) pkgs;
in
{
  options.corral.sandbox = {
    template = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = lib.literalExpression "./templates/python.toml";
      description = "A Corral template file; every other option defaults to its values.";
    };

    name = templateOption "name" {
      type = types.str;
      description = "The template's name.";
    };
    description = templateOption "description" { type = types.str; };
    base = templateOption "base" { type = types.enum corral.bases; };
    packages = templateOption "packages" {
      type = types.listOf types.str;
      description = "Debian package names (mapped to nixpkgs, see `nixpkgs`).";
    };
    files = templateOption "files" { type = types.listOf fileType; };
    env = templateOption "env" { type = types.attrsOf types.str; };
    workdir = templateOption "workdir" { type = types.str; };
    user = templateOption "user" {
      type = types.submodule {
        options = {
          name = mkOption { type = types.str; };
          uid = mkOption { type = types.ints.between 0 65535; };
          gid = mkOption { type = types.ints.between 0 65535; };
        };
      };
    };
    resources = templateOption "resources" {
      type = types.submodule {
        options = {
          vcpus = mkOption { type = types.number; };
          memory = mkOption {
            type = size;
            description = "Bytes, or a size like \"512M\".";
          };
          pids = mkOption { type = types.int; };
          disk = mkOption {
            type = size;
            description = "Scratch size: bytes, or a size like \"256M\".";
          };
          cpuset = mkOption {
            type = types.nullOr types.str;
            default = null;
          };
        };
      };
    };
    network = templateOption "network" {
      type = types.enum [
        "none"
        "egress"
      ];
    };
    mounts = templateOption "mounts" { type = types.listOf mountType; };
    isolation = templateOption "isolation" {
      type = types.listOf (
        types.enum [
          "container"
          "gvisor"
          "microvm"
        ]
      );
    };
    kind = templateOption "kind" {
      type = types.enum [
        "ephemeral"
        "persistent"
      ];
    };
    timeout = templateOption "timeout" { type = types.ints.positive; };

    services = mkOption {
      type = types.attrsOf serviceType;
      default = { };
      description = ''
        Long-running processes of the sandbox: systemd units in a microVM guest,
        scripts under /etc/corral/services in the OCI image.
      '';
    };

    hypervisor = mkOption {
      type = types.enum [
        "firecracker"
        "cloud-hypervisor"
        "qemu"
      ];
      default = corral.hypervisorFor cfg.normalized;
      defaultText = lib.literalMD "chosen from the template (`hypervisorFor` in nix/lib/realize.nix)";
      description = "The microVM hypervisor.";
    };

    nixpkgs = mkOption {
      type = types.listOf types.str;
      default = corral.nixpkgsFor cfg.normalized (registry.nixpkgs.${cfg.name} or [ ]);
      defaultText = lib.literalMD "the base's tools and the template's packages, mapped to nixpkgs";
      description = "nixpkgs attribute paths installed in the image and the guest.";
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      description = "More packages for the image and the guest.";
    };

    normalized = mkOption {
      type = types.attrs;
      readOnly = true;
      internal = true;
      description = "The options as a normalized template, validated like Python does.";
    };

    resolvedPackages = mkOption {
      type = types.listOf types.package;
      readOnly = true;
      internal = true;
    };
  };

  config.corral.sandbox = {
    normalized = corral.parseTemplate { source = "corral.sandbox (module options)"; } {
      inherit (cfg)
        name
        description
        base
        packages
        files
        env
        workdir
        user
        network
        mounts
        isolation
        kind
        timeout
        ;
      resources = lib.filterAttrs (_: v: v != null) cfg.resources;
    };
    resolvedPackages = map resolve cfg.nixpkgs ++ cfg.extraPackages;
  };
}
