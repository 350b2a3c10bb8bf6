# An EC2 instance (no nested KVM): containers and gVisor only.
# Deploy: build an AMI from this configuration, or nixos-anywhere/Colmena onto a
# NixOS AMI (see nix/README.md).
{ modulesPath, ... }:
{
  imports = [
    "${modulesPath}/virtualisation/amazon-image.nix"
    ./common.nix
  ];

  networking.hostName = "aws-container-host";

  services.corral = {
    enable = true;
    mode = "container";
    # gVisor by default on shared cloud hosts
    settings.oci.runtime = "runsc";
  };
}
