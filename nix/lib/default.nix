# Corral's Nix library. Builtins only, so the flake's `lib` (and every output's
# attribute names) evaluate without nixpkgs. See nix/README.md.
#
#   readTemplate path     a template file, validated and normalized as Python does
#   parseTemplate { source } data, parseSize source value, defaults
#   templates             name -> { path, template, nixpkgs } for nix/templates.nix
#   microvmFor, ociConfigFor, hypervisorFor, imageKey, nixpkgsFor  (realize.nix)
let
  inherit (builtins)
    attrNames
    filter
    length
    listToAttrs
    map
    match
    readDir
    ;
  template = import ./template.nix;
  realize = import ./realize.nix;
  registry = import ../templates.nix;

  builtinDir = ../../src/corral/spec/builtin;
  builtinFiles = map (f: builtinDir + "/${f}") (
    filter (f: match ".*\\.toml" f != null) (attrNames (readDir builtinDir))
  );

  entry =
    path:
    let
      t = template.readTemplate path;
    in
    {
      name = t.name;
      value = {
        inherit path;
        template = t;
        nixpkgs = realize.nixpkgsFor t (registry.nixpkgs.${t.name} or [ ]);
      };
    };
  entries = map entry (builtinFiles ++ registry.extra);
  templates = listToAttrs entries;
  templateNames = attrNames templates;
in
assert
  length templateNames == length entries
  || throw "nix/templates.nix: two templates have the same name (names: ${toString (map (e: e.name) entries)})";
template
// realize
// {
  inherit templates templateNames;
  ociPackageNames = map (n: "${n}-oci") templateNames;
  microvmPackageNames = map (n: "${n}-microvm") templateNames;
}
