# What every Corral host shares: flakes on, SSH with keys only, and an admin
# account for deploys (Colmena and nixos-anywhere connect as root over SSH).
{ lib, ... }:
{
  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];
  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };
  };
  # Replace with your deploy key(s).
  users.users.root.openssh.authorizedKeys.keys = lib.mkDefault [ ];
  time.timeZone = "UTC";
  system.stateVersion = "26.05";
}
