# corral.sandbox.oci.image: the sandbox as an OCI image (a dockerTools layered
# image, `docker save` format), which the flake exposes as `<name>-oci` and
# corral's `nix` image builder unpacks (src/corral/images/nix.py).
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
  inherit (t) user;
  uid = toString user.uid;
  gid = toString user.gid;
  key = corral.imageKey t;

  home = if user.uid == 0 then "/root" else "/home/${user.name}";
  q = lib.escapeShellArg;

  # Accounts as Corral's skeleton writes them (src/corral/images/skeleton.py),
  # as real files: the skeleton refuses to write through symlinks.
  passwd = lib.concatStringsSep "\n" (
    [ "root:x:0:0:root:/root:/bin/sh" ]
    ++ lib.optional (user.name != "root") "${user.name}:x:${uid}:${gid}:${user.name}:${home}:/bin/sh"
  );
  group = lib.concatStringsSep "\n" (
    [ "root:x:0:" ] ++ lib.optional (user.name != "root") "${user.name}:x:${gid}:"
  );
  writeText = path: text: mode: ''
    rm -f .${q path}
    install -D -m ${mode} ${pkgs.writeText "corral-file" text} .${q path}
  '';
in
{
  options.corral.sandbox.oci = {
    tag = lib.mkOption {
      type = lib.types.str;
      default = if key == null then "latest" else builtins.substring 0 16 key;
      defaultText = lib.literalMD "the first 16 hex digits of Python's `Template.image_key()`";
      description = "The image tag.";
    };
    image = lib.mkOption {
      type = lib.types.package;
      readOnly = true;
      description = "The OCI image (docker-archive .tar.gz) of this sandbox.";
    };
  };

  config.corral.sandbox.oci.image = pkgs.dockerTools.buildLayeredImage {
    name = "corral-${t.name}";
    inherit (cfg.oci) tag;
    contents = cfg.resolvedPackages;
    config = corral.ociConfigFor t // {
      Cmd = [ "/bin/sh" ];
    };
    # Runs in the image's root. The template's files are written here, not taken
    # from the store, whose files are all 0444 or 0555: this keeps their modes.
    fakeRootCommands = ''
      mkdir -p tmp && chmod 1777 tmp
      # the template's PATH names /usr/bin; Nix packages land in /bin
      if [ ! -e usr/bin ]; then mkdir -p usr && ln -s ../bin usr/bin; fi
      ${writeText "/etc/passwd" "${passwd}\n" "0644"}
      ${writeText "/etc/group" "${group}\n" "0644"}
      ${writeText "/etc/nsswitch.conf" "passwd: files\ngroup: files\nhosts: files dns\n" "0644"}
      ${lib.concatMapStrings (f: writeText f.path f.content f.mode) t.files}
      ${lib.concatStrings (
        lib.mapAttrsToList (
          name: s: writeText "/etc/corral/services/${name}" s.script "0755"
        ) cfg.services
      )}
      mkdir -p .${q t.workdir} .${q home}
      chown ${uid}:${gid} .${q t.workdir} .${q home}
      ${lib.optionalString (t.volume != null) "mkdir -p .${q t.volume.path}"}
    '';
    # created stays at the epoch: the same template gives the same image digest.
  };
}
