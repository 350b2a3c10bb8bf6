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
    # Read by the remote client (`corral --context`, a later issue): which host
    # `corral` talks to. The API is only on the host's loopback, reached over SSH.
    xdg.configFile."corral/contexts.toml".text = ''
      current = "${remote}"

      [contexts.${remote}]
      url = "ssh://corral@${remote}"
      api = "http://127.0.0.1:8731"
      default_template = "default"
    '';
    home.sessionVariables.CORRAL_CONTEXT = remote;
    programs.ssh = {
      enable = true;
      matchBlocks.${remote} = {
        hostname = "${remote}.example.internal";
        user = "corral";
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
