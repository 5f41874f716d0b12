use super::*;
use crate::recipe::Recipe;

fn recipe(extra: &str) -> Recipe {
    Recipe::parse(
        Path::new("/r/test.toml"),
        &format!("[image]\nname = \"t\"\nversion = \"2\"\n{extra}"),
    )
    .unwrap()
}

#[test]
fn one_line_sources_parse() {
    let text = "# comment\ndeb http://deb.debian.org/debian bookworm main contrib\ndeb-src http://x bookworm main\ndeb [signed-by=/k.gpg] https://m/debian bookworm-updates main # tail\n";
    let s = parse_one_line_sources(text);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].components, vec!["main", "contrib"]);
    assert_eq!(s[1].uri, "https://m/debian");
    assert_eq!(s[1].suite, "bookworm-updates");
}

#[test]
fn deb822_sources_parse() {
    let text = "Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://x\nSuites: bookworm-security\nComponents: main\nEnabled: no\n\nTypes: deb-src\nURIs: http://y\nSuites: bookworm\nComponents: main\n";
    let s = parse_deb822_sources(text);
    assert_eq!(s.len(), 2);
    assert_eq!(s[1].suite, "bookworm-updates");
}

#[test]
fn host_mirrors_keep_only_the_suite_family() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("sources.list.d")).unwrap();
    fs::write(
        dir.path().join("sources.list"),
        "deb http://a/debian bookworm main\ndeb http://c/apt cloud-sdk-bookworm main\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("sources.list.d/debian.sources"),
        "Types: deb\nURIs: http://a/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\nURIs: http://a/debian\nSuites: bookworm-backports\nComponents: main\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("sources.list.d/ignored.txt"),
        "deb http://z bookworm main\n",
    )
    .unwrap();
    let m = host_mirrors(dir.path(), "bookworm").unwrap();
    assert_eq!(
        m,
        vec![
            "deb http://a/debian bookworm main".to_string(),
            "deb http://a/debian-security bookworm-security main".to_string()
        ]
    );
}

#[test]
fn mmdebstrap_args_carry_recipe_and_cache() {
    let r = recipe("[base]\npackages = [\"curl\"]\n");
    let args = mmdebstrap_args(
        &r,
        &["http://m/debian".into()],
        Path::new("/w/root"),
        Path::new("/c"),
        Path::new("/w/early"),
    );
    let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
    let include = args.iter().find(|a| a.starts_with("--include=")).unwrap();
    assert!(include.contains("curl") && include.contains("linux-image-amd64"));
    assert!(args.contains(&"--setup-hook=sync-in /c /var/cache/apt/archives/".to_string()));
    assert!(args.contains(&"--customize-hook=sync-out /var/cache/apt/archives /c".to_string()));
    assert!(args.contains(&"--essential-hook=sync-in /w/early /".to_string()));
    assert!(args
        .iter()
        .any(|a| a == "--aptopt=APT::Install-Recommends \"false\""));
    assert!(args
        .iter()
        .any(|a| a.starts_with("--dpkgopt=path-exclude=/usr/share/doc")));
    let n = args.len();
    assert_eq!(&args[n - 3..], &["bookworm", "/w/root", "http://m/debian"]);
}

#[test]
fn docs_true_keeps_documentation() {
    let r = recipe("[base]\ndocs = true\n");
    let args = mmdebstrap_args(
        &r,
        &[],
        Path::new("/w/root"),
        Path::new("/c"),
        Path::new("/w/e"),
    );
    assert!(!args
        .iter()
        .any(|a| a.to_string_lossy().starts_with("--dpkgopt")));
}

#[test]
fn resolve_in_root_never_leaves_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("usr/lib")).unwrap();
    symlink("usr/lib", root.join("lib")).unwrap();
    symlink("/usr/lib/os-release", root.join("usr/lib/link-abs")).unwrap();
    symlink("../../../../../etc", root.join("usr/escape")).unwrap();
    assert_eq!(
        resolve_in_root(root, "/lib/systemd/x.service", false).unwrap(),
        root.join("usr/lib/systemd/x.service")
    );
    assert_eq!(
        resolve_in_root(root, "/usr/lib/link-abs", true).unwrap(),
        root.join("usr/lib/os-release")
    );
    assert_eq!(
        resolve_in_root(root, "/usr/lib/link-abs", false).unwrap(),
        root.join("usr/lib/link-abs")
    );
    assert_eq!(
        resolve_in_root(root, "/usr/escape/passwd", false).unwrap(),
        root.join("etc/passwd")
    );
    symlink("loop2", root.join("loop1")).unwrap();
    symlink("loop1", root.join("loop2")).unwrap();
    assert!(resolve_in_root(root, "/loop1/x", false)
        .unwrap_err()
        .to_string()
        .contains("too many"));
}

#[test]
fn write_image_file_replaces_a_final_symlink_instead_of_following_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    let outside = dir.path().join("outside");
    fs::write(&outside, "keep").unwrap();
    symlink(&outside, root.join("etc/resolv.conf")).unwrap();
    write_image_file(&root, "/etc/resolv.conf", b"nameserver 127.0.0.1\n", 0o600).unwrap();
    assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
    let meta = fs::symlink_metadata(root.join("etc/resolv.conf")).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn os_release_gets_image_fields() {
    let r = recipe("");
    let text = render_os_release("PRETTY_NAME=\"Debian\"\nID=debian\nIMAGE_VERSION=old\n", &r);
    assert!(text.contains("ID=debian\n"));
    assert!(text.contains("IMAGE_ID=t\nIMAGE_VERSION=2\n"));
    assert!(text.contains("PRETTY_NAME=\"t 2\""));
    assert!(!text.contains("old"));
}

#[test]
fn find_kernel_requires_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    fs::create_dir(&boot).unwrap();
    assert!(find_kernel(dir.path())
        .unwrap_err()
        .to_string()
        .contains("no kernel"));
    fs::write(boot.join("vmlinuz-6.1.0-1-amd64"), "k").unwrap();
    assert!(find_kernel(dir.path())
        .unwrap_err()
        .to_string()
        .contains("no initrd"));
    fs::write(boot.join("initrd.img-6.1.0-1-amd64"), "i").unwrap();
    assert_eq!(
        find_kernel(dir.path()).unwrap().kernel_version,
        "6.1.0-1-amd64"
    );
    fs::write(boot.join("vmlinuz-6.1.0-2-amd64"), "k").unwrap();
    assert!(find_kernel(dir.path())
        .unwrap_err()
        .to_string()
        .contains("2 kernels"));
}
