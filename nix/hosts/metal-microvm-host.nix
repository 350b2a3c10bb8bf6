# A bare-metal server with KVM: containers, gVisor and microVM guests (one per
# template of nix/templates.nix). Disks are by label: partition and label them
# (or let nixos-anywhere with disko do it; see nix/README.md).
{ lib, ... }:
{
  imports = [ ./common.nix ];

  networking.hostName = "metal-microvm-host";

  boot.loader.systemd-boot.enable = true;
  boot.loader.efi.canTouchEfiVariables = true;
  boot.initrd.availableKernelModules = [
    "nvme"
    "ahci"
    "xhci_pci"
    "usbhid"
    "sd_mod"
  ];
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };
  fileSystems."/boot" = {
    device = "/dev/disk/by-label/boot";
    fsType = "vfat";
    options = [ "umask=0077" ];
  };

  networking.useNetworkd = true;
  systemd.network.networks."10-uplink" = {
    matchConfig.Type = "ether";
    matchConfig.Name = "en*";
    networkConfig.DHCP = "yes";
  };

  services.corral = {
    enable = true;
    mode = "microvm";
    autostartSandboxes = lib.mkDefault false;
  };
}
