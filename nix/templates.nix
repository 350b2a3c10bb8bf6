# The templates the flake builds `<name>-oci` images and `<name>-microvm` guests
# for: every built-in (src/corral/spec/builtin/*.toml) plus the files in `extra`.
# Add yours here; the package name is the template's `name`.
{
  # More template files, as paths relative to this file, e.g. ../templates/python.toml
  extra = [ ];

  # nixpkgs attribute paths added to a template's image and guest, by template
  # name: what the Python builders take from the host has to come from nixpkgs here
  # (the rust template's toolchain is the host's, mounted at /opt/rust, there).
  nixpkgs = {
    rust = [
      "rustc"
      "cargo"
      "gcc"
    ];
  };
}
