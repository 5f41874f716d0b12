use super::*;

const MINIMAL: &str = r#"
[image]
name = "demo"
version = "1.2.3"
"#;

fn parse(text: &str) -> Result<Recipe, RecipeError> {
    Recipe::parse(Path::new("test.toml"), text)
}

#[test]
fn minimal_recipe_gets_defaults() {
    let r = parse(MINIMAL).unwrap();
    assert_eq!(r.image.name, "demo");
    assert_eq!(r.image.version, "1.2.3");
    assert_eq!(r.image.pretty_name, "demo 1.2.3");
    assert_eq!(r.image.hostname, "demo");
    assert_eq!(r.base.suite, "bookworm");
    assert!(r.base.mirrors.is_empty());
    assert!(r.base.packages.contains(&"linux-image-amd64".to_string()));
    assert_eq!(r.kernel.initrd, InitrdMode::Small);
    assert_eq!(r.disk.root_size, DEFAULT_ROOT_SIZE);
    assert_eq!(r.formats, vec![Format::Raw, Format::Qcow2]);
    assert!(r.systemd.boot_report);
    assert_eq!(r.stem(), "demo-1.2.3");
}

#[test]
fn full_recipe_parses() {
    let text = r#"
[image]
name = "node"
version = "2024.1"
pretty_name = "Node OS"
architecture = "amd64"
source_date_epoch = 1700000000

[base]
suite = "bookworm"
mirrors = ["http://deb.debian.org/debian", "deb http://deb.debian.org/debian-security bookworm-security main"]
packages = ["openssh-server", "curl", "systemd"]

[kernel]
cmdline = "console=ttyS0 quiet"
initrd = "full"
initrd_modules = ["virtio_net"]

[[files]]
path = "/etc/motd"
content = "hi\n"
mode = "0600"

[systemd]
enable = ["systemd-networkd.service"]
mask = ["apt-daily.timer"]

[disk]
esp_size = "128MiB"
root_size = "2G"
var_size = "1073741824"

[output]
formats = ["qcow2"]
"#;
    let r = parse(text).unwrap();
    assert_eq!(r.base.mirrors.len(), 2);
    assert_eq!(
        r.base.packages.iter().filter(|p| *p == "systemd").count(),
        1,
        "duplicates are removed"
    );
    assert!(r.base.packages.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(r.kernel.initrd, InitrdMode::Full);
    assert!(r.kernel.initrd_modules.contains(&"virtio_net".to_string()));
    assert_eq!(r.files[0].mode, 0o600);
    assert_eq!(r.files[0].content, FileContent::Inline("hi\n".into()));
    assert_eq!(r.disk.esp_size, 128 * MIB);
    assert_eq!(r.disk.root_size, 2048 * MIB);
    assert_eq!(r.disk.var_size, 1024 * MIB);
    assert_eq!(
        r.formats,
        vec![Format::Qcow2],
        "raw is kept only when listed"
    );
    assert_eq!(r.image.source_date_epoch, Some(1_700_000_000));
}

#[test]
fn install_media_formats() {
    let r =
        parse("[image]\nname = \"x\"\nversion = \"1\"\n[output]\nformats = [\"pxe\", \"iso\"]\n")
            .unwrap();
    assert_eq!(r.formats, vec![Format::Iso, Format::Pxe]);
    assert_eq!(Format::Iso.to_string(), "iso");
    assert_eq!(Format::Pxe.extension(), "pxe");
}

fn invalid(text: &str) -> RecipeError {
    parse(text).expect_err("recipe should be rejected")
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let e = invalid("[image]\nname = \"x\"\nversion = 1.0.0\n");
    let (line, _col) = e.position().unwrap();
    assert_eq!(line, 3);
    assert!(e.to_string().starts_with("test.toml:3:"), "{e}");
}

#[test]
fn unknown_field_is_rejected_with_position() {
    let e = invalid("[image]\nname = \"x\"\nversion = \"1\"\ncolour = \"red\"\n");
    assert_eq!(e.position().unwrap().0, 4);
    assert!(e.to_string().contains("colour"), "{e}");
}

#[test]
fn missing_required_field_is_named() {
    let e = invalid("[image]\nname = \"x\"\n");
    assert!(e.to_string().contains("version"), "{e}");
}

#[test]
fn bad_values_name_field_and_position() {
    let cases: &[(&str, &str, usize)] = &[
            ("[image]\nname = \"Bad Name\"\nversion = \"1\"\n", "image.name", 2),
            ("[image]\nname = \"x\"\nversion = \"1 0\"\n", "image.version", 3),
            ("[image]\nname = \"x\"\nversion = \"1\"\narchitecture = \"arm64\"\n", "image.architecture", 4),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[base]\npackages = [\"ok\", \"rm -rf\"]\n", "base.packages[1]", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[base]\nmirrors = [\"ftp://x\"]\n", "base.mirrors[0]", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[base]\nmirrors = [\"deb [trusted=yes] http://x bookworm main\"]\n", "base.mirrors[0]", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[base]\nsuite = \"bookworm;reboot\"\n", "base.suite", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[kernel]\ncmdline = \"root=/dev/sda1\"\n", "kernel.cmdline", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[kernel]\ninitrd = \"tiny\"\n", "kernel.initrd", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[[files]]\npath = \"etc/motd\"\ncontent = \"\"\n", "files[0].path", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[[files]]\npath = \"/etc/../shadow\"\ncontent = \"\"\n", "files[0].path", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[[files]]\npath = \"/etc/x\"\ncontent = \"\"\nmode = \"0999\"\n", "files[0].mode", 7),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[[files]]\npath = \"/etc/x\"\n", "files[0]", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[[files]]\npath = \"/etc/x\"\nsource = \"does-not-exist\"\n", "files[0].source", 6),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[systemd]\nenable = [\"sshd\"]\n", "systemd.enable[0]", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[disk]\nroot_size = \"12 parsecs\"\n", "disk.root_size", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[disk]\nesp_size = \"32M\"\n", "disk.esp_size", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[disk]\nvar_size = \"100000K\"\n", "disk.var_size", 5),
            ("[image]\nname = \"x\"\nversion = \"1\"\n[output]\nformats = [\"vmdk\"]\n", "output.formats[0]", 5),
        ];
    for (text, field, line) in cases {
        let e = invalid(text);
        assert_eq!(e.field(), Some(*field), "{text}: {e}");
        assert_eq!(e.position().map(|p| p.0), Some(*line), "{text}: {e}");
        assert!(
            e.to_string().starts_with(&format!("test.toml:{line}:")),
            "{e}"
        );
    }
}

#[test]
fn duplicate_file_paths_are_rejected() {
    let e = invalid(
            "[image]\nname = \"x\"\nversion = \"1\"\n[[files]]\npath = \"/a\"\ncontent = \"1\"\n[[files]]\npath = \"/a\"\ncontent = \"2\"\n",
        );
    assert_eq!(e.field(), Some("files[1].path"));
    assert!(e.to_string().contains("twice"));
}

#[test]
fn source_files_resolve_against_recipe_dir_and_change_digest() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("motd"), "one").unwrap();
    let path = dir.path().join("r.toml");
    let text = "[image]\nname = \"x\"\nversion = \"1\"\n[[files]]\npath = \"/etc/motd\"\nsource = \"motd\"\n";
    fs::write(&path, text).unwrap();
    let a = Recipe::load(&path).unwrap();
    assert_eq!(
        a.files[0].content,
        FileContent::Source(dir.path().join("motd"))
    );
    fs::write(dir.path().join("motd"), "two").unwrap();
    let b = Recipe::load(&path).unwrap();
    assert_ne!(a.digest, b.digest, "digest covers source files");
    assert_ne!(a.id_seed(), b.id_seed());
}

#[test]
fn unreadable_recipe_names_the_path() {
    let e = Recipe::load(Path::new("/nonexistent/recipe.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/recipe.toml"), "{e}");
}

#[test]
fn sizes_parse_with_binary_units() {
    assert_eq!(parse_size("512MiB").unwrap(), 512 * MIB);
    assert_eq!(parse_size("1G").unwrap(), 1 << 30);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
    assert!(parse_size("1.5G").is_err());
    assert!(parse_size("G").is_err());
    assert!(parse_size("99999999999T").is_err());
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("abc", 0), (1, 1));
    assert_eq!(line_col("a\nbc", 3), (2, 2));
    assert_eq!(line_col("a\n", 99), (2, 1));
}

const SHA_A: &str = "03b8fea715a7ef82eeaf518dee34c72670c57cc7bc40dc1320c04fbf4f15172f";
const SHA_B: &str = "ab3bda535f9d90766cccc90d3dddb5482003dd744d7f22bcf98186bf8eea8be6";

#[test]
fn artifacts_parse_with_defaults_and_archives() {
    let text = format!(
        r#"
[image]
name = "x"
version = "1"
[downloads]
mirror = "mirror"
[[artifacts]]
name = "kubelet"
url = "https://dl.k8s.io/release/v1.34.4/bin/linux/amd64/kubelet"
sha256 = "{SHA_A}"
dest = "/usr/bin/kubelet"
[[artifacts]]
name = "cni-plugins"
url = "https://example.org/cni-plugins-linux-amd64-v1.8.0.tgz?x=1"
sha256 = "{SHA_B}"
extract = "tar.gz"
members = {{ "./bridge" = "/opt/cni/bin/bridge", "loopback" = "/opt/cni/bin/loopback" }}
mode = "0700"
"#
    );
    let r = Recipe::parse(Path::new("/r/test.toml"), &text).unwrap();
    assert_eq!(r.artifacts.len(), 2);
    let k = &r.artifacts[0];
    assert_eq!(k.mode, 0o755, "binaries default to 0755");
    assert_eq!(k.file_name(), "kubelet");
    assert_eq!(
        k.install,
        ArtifactInstall::File {
            dest: "/usr/bin/kubelet".into()
        }
    );
    let c = &r.artifacts[1];
    assert_eq!(c.file_name(), "cni-plugins-linux-amd64-v1.8.0.tgz");
    assert_eq!(c.mode, 0o700);
    assert_eq!(
        c.install.dests(),
        ["/opt/cni/bin/bridge", "/opt/cni/bin/loopback"]
    );
    assert_eq!(r.downloads.mirror, Some(PathBuf::from("/r/mirror")));
    assert!(r.includes.is_empty());
}

#[test]
fn bad_artifacts_name_the_field() {
    let head = "[image]\nname = \"x\"\nversion = \"1\"\n[[artifacts]]\nname = \"a\"\n";
    let cases: Vec<(String, &str)> = vec![
            (format!("{head}url = \"ftp://x/a\"\nsha256 = \"{SHA_A}\"\ndest = \"/a\"\n"), "artifacts[0].url"),
            (format!("{head}url = \"https://x/\"\nsha256 = \"{SHA_A}\"\ndest = \"/a\"\n"), "artifacts[0].url"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"ABC\"\ndest = \"/a\"\n"), "artifacts[0].sha256"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{}\"\ndest = \"/a\"\n", SHA_A.to_uppercase()), "artifacts[0].sha256"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\n"), "artifacts[0].dest"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\ndest = \"a\"\n"), "artifacts[0].dest"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\nextract = \"zip\"\n"), "artifacts[0].extract"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\nextract = \"tar.gz\"\n"), "artifacts[0].members"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\nextract = \"tar.gz\"\nmembers = {{ \"../etc/passwd\" = \"/a\" }}\n"), "artifacts[0].members"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\nextract = \"tar.gz\"\nmembers = {{ \"-rf\" = \"/a\" }}\n"), "artifacts[0].members"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\ndest = \"/a\"\nmode = \"9\"\n"), "artifacts[0].mode"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\ndest = \"/a\"\n[[artifacts]]\nname = \"a\"\nurl = \"https://x/b\"\nsha256 = \"{SHA_A}\"\ndest = \"/b\"\n"), "artifacts[1].name"),
            (format!("{head}url = \"https://x/a\"\nsha256 = \"{SHA_A}\"\ndest = \"/etc/motd\"\n[[files]]\npath = \"/etc/motd\"\ncontent = \"\"\n"), "artifacts[0]"),
        ];
    for (text, field) in &cases {
        let e = invalid(text);
        assert_eq!(e.field(), Some(*field), "{text}: {e}");
        assert!(e.position().is_some(), "positions are kept: {e}");
    }
}

fn write_recipes(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn base_recipe() -> String {
    format!(
        r#"[image]
name = "node"
version = "1"
[base]
packages = ["containerd"]
[kernel]
initrd_modules = ["br_netfilter"]
[[files]]
path = "/etc/motd"
content = "base"
[[files]]
path = "/etc/issue"
content = "issue"
[[artifacts]]
name = "kubelet"
url = "https://dl.k8s.io/release/v1.34.4/bin/linux/amd64/kubelet"
sha256 = "{SHA_A}"
dest = "/usr/bin/kubelet"
[[artifacts]]
name = "crictl"
url = "https://example.org/crictl.tar.gz"
sha256 = "{SHA_B}"
extract = "tar.gz"
members = {{ crictl = "/usr/bin/crictl" }}
"#
    )
}

#[test]
fn include_merges_tables_and_replaces_entries_by_key() {
    let overlay = format!(
        r#"include = "base.toml"
[image]
name = "node-local"
[downloads]
mirror = "/var/cache/imgbuild/k8s/bin"
[[files]]
path = "/etc/motd"
content = "local"
[[artifacts]]
name = "kubelet"
url = "https://dl.k8s.io/release/v1.20.2/bin/linux/amd64/kubelet"
sha256 = "{SHA_B}"
dest = "/usr/bin/kubelet"
[[artifacts]]
name = "crictl"
remove = true
"#
    );
    let dir = write_recipes(&[("base.toml", &base_recipe()), ("local.toml", &overlay)]);
    let base = Recipe::load(&dir.path().join("base.toml")).unwrap();
    let r = Recipe::load(&dir.path().join("local.toml")).unwrap();
    assert_eq!(r.includes, vec![dir.path().join("base.toml")]);
    assert_eq!(r.image.name, "node-local", "scalars are replaced");
    assert_eq!(r.image.version, "1", "untouched keys are inherited");
    assert!(r.base.packages.contains(&"containerd".to_string()));
    assert!(r
        .kernel
        .initrd_modules
        .contains(&"br_netfilter".to_string()));
    assert_eq!(r.files.len(), 2);
    let motd = r.files.iter().find(|f| f.path == "/etc/motd").unwrap();
    assert_eq!(motd.content, FileContent::Inline("local".into()));
    assert_eq!(r.artifacts.len(), 1, "crictl removed");
    assert_eq!(r.artifacts[0].sha256, SHA_B);
    assert!(r.artifacts[0].url.contains("v1.20.2"));
    assert_eq!(
        r.downloads.mirror,
        Some(PathBuf::from("/var/cache/imgbuild/k8s/bin"))
    );
    assert_ne!(r.digest, base.digest);
    // Changing the included recipe changes the including recipe's digest.
    let again = Recipe::load(&dir.path().join("local.toml")).unwrap();
    assert_eq!(again.digest, r.digest, "stable");
    fs::write(
        dir.path().join("base.toml"),
        base_recipe().replace("content = \"issue\"", "content = \"issue2\""),
    )
    .unwrap();
    let changed = Recipe::load(&dir.path().join("local.toml")).unwrap();
    assert_ne!(changed.digest, r.digest);
}

#[test]
fn include_errors_are_clear() {
    let base = base_recipe();
    let cases: Vec<(&str, String, &str)> = vec![
            ("include = \"../base.toml\"\n", String::new(), "include"),
            ("include = \"missing.toml\"\n", String::new(), "include"),
            ("include = \"local.toml\"\n", String::new(), "include"),
            (
                "include = \"base.toml\"\n[[artifacts]]\nname = \"nope\"\nremove = true\n",
                String::new(),
                "artifacts[0].name",
            ),
            (
                "include = \"base.toml\"\n[[artifacts]]\nname = \"kubelet\"\nremove = true\ndest = \"/x\"\n",
                String::new(),
                "artifacts[0]",
            ),
            (
                "include = \"base.toml\"\n[[artifacts]]\nname = \"kubelet\"\nurl = \"https://x/k\"\nsha256 = \"bad\"\ndest = \"/usr/bin/kubelet\"\n",
                String::new(),
                "artifacts[0].sha256",
            ),
        ];
    for (overlay, _, field) in &cases {
        let dir = write_recipes(&[("base.toml", &base), ("local.toml", overlay)]);
        let e = Recipe::load(&dir.path().join("local.toml")).unwrap_err();
        assert_eq!(e.field(), Some(*field), "{overlay}: {e}");
        assert!(e.to_string().contains("local.toml"), "{e}");
    }
    // An error in the included recipe points into that file, with its position.
    let broken = base.replace("version = \"1\"", "version = \"1 0\"");
    let dir = write_recipes(&[
        ("base.toml", &broken),
        ("local.toml", "include = \"base.toml\"\n"),
    ]);
    let e = Recipe::load(&dir.path().join("local.toml")).unwrap_err();
    assert_eq!(e.field(), Some("image.version"));
    assert!(e.to_string().contains("base.toml:3:"), "{e}");
    // Cycles stop.
    let dir = write_recipes(&[
        (
            "a.toml",
            "include = \"b.toml\"\n[image]\nname = \"a\"\nversion = \"1\"\n",
        ),
        (
            "b.toml",
            "include = \"a.toml\"\n[image]\nname = \"b\"\nversion = \"1\"\n",
        ),
    ]);
    let e = Recipe::load(&dir.path().join("a.toml")).unwrap_err();
    assert!(e.to_string().contains("deeper"), "{e}");
}

#[test]
fn shipped_k8s_recipes_pin_what_issue_8_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let node = Recipe::load(&dir.join("k8s-node.toml")).unwrap();
    let pins: BTreeMap<&str, (&str, &str)> = node
        .artifacts
        .iter()
        .map(|a| (a.name.as_str(), (a.url.as_str(), a.sha256.as_str())))
        .collect();
    assert_eq!(
        pins["kubelet"],
        (
            "https://dl.k8s.io/release/v1.34.4/bin/linux/amd64/kubelet",
            "03b8fea715a7ef82eeaf518dee34c72670c57cc7bc40dc1320c04fbf4f15172f"
        )
    );
    assert_eq!(
        pins["kubeadm"].1,
        "b967f1fa0e36621c402d38bb560eb4a943954d5cf5a00e5150842f6f5da73455"
    );
    assert_eq!(
        pins["kubectl"].1,
        "d50c359d95e0841eaad08ddc27c7be37cba8fdccfba5c8e2ded65e121ff112db"
    );
    assert_eq!(
        pins["crictl"].1,
        "a8ff2a3edb37a98daf3aba7c3b284fe0aa5bff24166d896ab9ef64c8913c9f51"
    );
    assert_eq!(
        pins["cni-plugins"].1,
        "ab3bda535f9d90766cccc90d3dddb5482003dd744d7f22bcf98186bf8eea8be6"
    );
    for p in ["containerd", "runc", "containernetworking-plugins"] {
        assert!(node.base.packages.contains(&p.to_string()), "{p}");
    }
    let config = node
        .files
        .iter()
        .find(|f| f.path == "/etc/containerd/config.toml")
        .unwrap();
    assert!(
        matches!(&config.content, FileContent::Inline(c) if c.contains("restrict_oom_score_adj = true"))
    );

    let local = Recipe::load(&dir.join("k8s-node-local.toml")).unwrap();
    assert_eq!(local.includes, vec![dir.join("k8s-node.toml")]);
    let names: Vec<&str> = local.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["kubelet", "kubeadm", "kubectl"]);
    assert!(local.artifacts.iter().all(|a| a.url.contains("/v1.20.2/")));
    assert_eq!(
        local.downloads.mirror,
        Some(PathBuf::from("/var/cache/imgbuild/k8s/bin"))
    );
    assert_eq!(local.systemd, node.systemd, "units are inherited");
    assert_eq!(local.disk, node.disk);
}

#[test]
fn shipped_recipes_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Recipe::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1, "no recipes found in {}", dir.display());
}

const ROOT_JSON: &str = r#"{"signed":{"_type":"root","version":1},"signatures":[]}"#;

/// Parses MINIMAL plus `update` in a directory holding `root.json` with `root`.
fn parse_update(update: &str, root: &str) -> (Result<Recipe, RecipeError>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root.json"), root).unwrap();
    let path = dir.path().join("r.toml");
    let text = format!("{MINIMAL}\n{update}");
    std::fs::write(&path, &text).unwrap();
    (Recipe::parse(&path, &text), dir)
}

#[test]
fn update_section_becomes_imgupdate_config() {
    let (r, _dir) = parse_update(
        r#"[update]
channel_url = "http://10.0.2.2:8080/"
trusted_root = "root.json"
strategy = "reboot"
check_interval_secs = 60

[update.lock]
backend = "fleetlock"
url = "http://10.0.2.2:8081"

[update.health]
checks = [{ kind = "units", units = ["ssh.service"] }]
"#,
        ROOT_JSON,
    );
    let r = r.unwrap();
    assert!(r.base.packages.contains(&"ca-certificates".to_string()));
    assert!(r.base.packages.windows(2).all(|w| w[0] < w[1]));
    let u = r.update.unwrap();
    assert!(u.trusted_root.ends_with("root.json"));
    assert!(u.binary.is_none());
    let cfg = imgupdate::Config::parse(&u.config_toml, "t").unwrap();
    assert_eq!(cfg.channel_url, "http://10.0.2.2:8080/");
    assert_eq!(cfg.trusted_root, Path::new(IMAGE_ROOT_JSON));
    assert_eq!(cfg.strategy, imgupdate::config::Strategy::Reboot);
    assert!(cfg.lock.is_some());
    assert!(!u.config_toml.contains(&*_dir.path().to_string_lossy()));
}

#[test]
fn no_update_section_means_no_updater() {
    let r = parse(MINIMAL).unwrap();
    assert!(r.update.is_none());
    assert!(!r.base.packages.contains(&"ca-certificates".to_string()));
}

#[test]
fn update_section_errors_name_the_field() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "[update]\nchannel_url = \"http://x/\"\n",
            ROOT_JSON,
            "update.trusted_root",
            "is required",
        ),
        (
            "[update]\nchannel_url = \"http://x/\"\ntrusted_root = \"missing.json\"\n",
            ROOT_JSON,
            "update.trusted_root",
            "cannot read",
        ),
        (
            "[update]\nchannel_url = \"http://x/\"\ntrusted_root = \"root.json\"\n",
            r#"{"signed":{"_type":"targets"}}"#,
            "update.trusted_root",
            "not root.json",
        ),
        (
            "[update]\nchannel_url = \"http://x/\"\ntrusted_root = \"root.json\"\n",
            "not json",
            "update.trusted_root",
            "not JSON",
        ),
        (
            "[update]\ntrusted_root = \"root.json\"\n",
            ROOT_JSON,
            "update",
            "channel_url",
        ),
        (
            "[update]\nchannel_url = \"http://x/\"\ntrusted_root = \"root.json\"\nchanel = 1\n",
            ROOT_JSON,
            "update",
            "chanel",
        ),
        (
            "[update]\nchannel_url = \"http://x/\"\ntrusted_root = \"root.json\"\ncheck_interval_secs = 1\n",
            ROOT_JSON,
            "update.check_interval_secs",
            "at least",
        ),
        (
            "[update]\nchannel_url = \"http://x/\"\ntrusted_root = \"root.json\"\nbinary = \"nope\"\n",
            ROOT_JSON,
            "update.binary",
            "cannot read",
        ),
        (
            "[update]\nchannel_url = \"http://x/\"\ntrusted_root = 7\n",
            ROOT_JSON,
            "update.trusted_root",
            "not a file path",
        ),
    ];
    for (update, root, field, needle) in cases {
        let (r, _dir) = parse_update(update, root);
        let e = r.expect_err(update);
        assert_eq!(e.field(), Some(*field), "{update}: {e}");
        assert!(e.to_string().contains(needle), "{update}: {e}");
        // The position points at the [update] table, after MINIMAL.
        assert!(e.position().is_some_and(|(line, _)| line > 4), "{e}");
    }
}

#[test]
fn trusted_root_content_is_part_of_the_digest() {
    let update = "[update]\nchannel_url = \"http://x/\"\ntrusted_root = \"root.json\"\n";
    let (a, _d1) = parse_update(update, ROOT_JSON);
    let other = ROOT_JSON.replace("\"version\":1", "\"version\":2");
    let (b, _d2) = parse_update(update, &other);
    assert_ne!(a.unwrap().digest, b.unwrap().digest);
}
