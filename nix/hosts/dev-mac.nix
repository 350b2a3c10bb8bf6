# A developer's Mac (nix-darwin + home-manager): the corral CLI from this flake,
# and a context file that points it at a remote Corral host, since sandboxes
# need Linux. A Linux builder VM lets the Mac build `<name>-oci` images too.
{ inputs, pkgs, ... }:
let
  user = "dev";
  remote = "metal-microvm-host";
in
{
  nixpkgs.hostPlatform = "aarch64-darwin";
  nixpkgs.overlays = [ inputs.self.overlays.default ];

  environment.systemPackages = [ pkgs.corral ];

  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];
  # aarch64-linux builds (images, guests) run in a local VM.
  nix.linux-builder.enable = true;

  users.users.${user}.home = "/Users/${user}";
  system.primaryUser = user;

  home-manager.useGlobalPkgs = true;
  home-manager.useUserPackages = true;
  home-manager.users.${user} = {
    # The CLI's contexts (`corral context ls`): the remote host's API, reached
    # through an SSH tunnel (`ssh -fN ${remote}` forwards local port 7070 to the
    # host's loopback-only `corral serve`). No key here (the Nix store is world-
    # readable): `corral` reads it from $CORRAL_API_KEY, e.g. set from the keychain.
    xdg.configFile."corral/contexts.json".text = builtins.toJSON {
      current = remote;
      contexts.${remote}.url = "http://127.0.0.1:7070";
    };
    programs.ssh = {
      enable = true;
      matchBlocks.${remote} = {
        hostname = "${remote}.example.internal";
        user = "corral";
        localForwards = [
          {
            bind.port = 7070;
            host.address = "127.0.0.1";
            host.port = 7070;
          }
        ];
        # keep one connection for the many short `corral exec` calls
        extraOptions = {
          ControlMaster = "auto";
          ControlPersist = "10m";
          ControlPath = "~/.ssh/cm-%r@%h:%p";
        };
      };
    };
    home.stateVersion = "26.05";
  };

  system.stateVersion = 6;
}
