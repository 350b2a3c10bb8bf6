# The Colmena hive (flake output `colmena`): the example hosts, deployed over
# SSH as root. `colmena apply --on @container` / `--on metal-microvm-host`.
# Set targetHost to your machines; the node names match nixosConfigurations.
{
  nixpkgs,
  specialArgs,
  hosts,
}:
{
  meta = {
    nixpkgs = import nixpkgs { system = "x86_64-linux"; };
    inherit specialArgs;
  };
}
// builtins.mapAttrs (name: host: {
  imports = host.modules;
  deployment = {
    targetHost = "${name}.example.internal";
    targetUser = "root";
    tags = [ host.tag ];
    buildOnTarget = false;
  };
}) hosts
