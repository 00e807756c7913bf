//! VM discovery: a datastore folder with VMs made here (a `.vmx` with a snapshot chain and a
//! `.vmsd`, an OVA whose OVF names two disks) and the corpus's Hyper-V `.vmcx` and encrypted
//! `.vmx`, plus hostile configurations that must fail alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blockferry_tests::{MIB, Rng, Sandbox, file_hash, have_qemu, make_image, qemu, qemu_from_raw};
use serde_json::Value;

use crate::ova::tar;

const WEB_VMX: &str = r#".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "web |22front|22"
uuid.bios = "42 1d 4a 6b 8e 4f 6e 3a-9c 5a 33 2d 52 0e 2b 97"
numvcpus = "4"
memSize = "8192"
firmware = "efi"
uefi.secureBoot.enabled = "TRUE"
guestOS = "debian12-64"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web-000001.vmdk"
sata0.present = "TRUE"
sata0:1.present = "TRUE"
sata0:1.fileName = "data.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "/vmfs/volumes/iso/debian.iso"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:3F:00:01"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000e"
ethernet1.networkName = "Backup"
ethernet1.addressType = "generated"
ethernet1.generatedAddress = "00:0c:29:aa:bb:cc"
ethernet1.startConnected = "FALSE"
ethernet2.present = "FALSE"
ethernet2.virtualDev = "vmxnet3"
checkpoint.vmsd = "web.vmsd"
"#;

const WEB_VMSD: &str = r#".encoding = "UTF-8"
snapshot.lastUID = "2"
snapshot.current = "2"
snapshot.numSnapshots = "2"
snapshot0.uid = "1"
snapshot0.filename = "web-Snapshot1.vmsn"
snapshot0.displayName = "before upgrade"
snapshot0.numDisks = "1"
snapshot0.disk0.fileName = "web.vmdk"
snapshot0.disk0.node = "scsi0:0"
snapshot1.uid = "2"
snapshot1.parent = "1"
snapshot1.displayName = "after upgrade"
snapshot1.numDisks = "1"
snapshot1.disk0.fileName = "web-000001.vmdk"
"#;

fn app_ovf() -> String {
    r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="app-disk1.vmdk" ovf:id="file1"/>
    <File ovf:href="app-disk2.vmdk" ovf:id="file2"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="24" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>Networks</Info><Network ovf:name="App Net"/></NetworkSection>
  <VirtualSystem ovf:id="app01">
    <Info>A VM</Info>
    <Name>app01</Name>
    <OperatingSystemSection ovf:id="94" vmw:osType="ubuntu64Guest"><Info>OS</Info><Description>Ubuntu Linux (64-bit)</Description></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Hardware</Info>
      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemIdentifier>app01</vssd:VirtualSystemIdentifier><vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>2 virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>4096MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>4096</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SCSI Controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard Disk 1</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:ElementName>Hard Disk 2</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:InstanceID>5</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:01:02:03</rasd:Address><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>App Net</rasd:Connection><rasd:ElementName>Network adapter 1</rasd:ElementName><rasd:InstanceID>6</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#
        .to_owned()
}

/// Every file under `dir` with its hash, to show discovery wrote nothing.
fn hashes(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), file_hash(&p));
            }
        }
    }
    out
}

fn vm_by<'a>(vms: &'a [Value], config_ends: &str) -> &'a Value {
    vms.iter()
        .find(|v| v["config"].as_str().unwrap().ends_with(config_ends))
        .unwrap_or_else(|| panic!("no VM from {config_ends}: {vms:#?}"))
}

/// Builds the datastore; returns it.
fn datastore(sb: &Sandbox, corpus: &Path) -> PathBuf {
    let mut rng = Rng::seeded("vms");
    let ds = sb.path("ds");
    // web: a VMDK snapshot chain (web.vmdk <- web-000001.vmdk) on scsi0:0, data.vmdk on sata0:1.
    let web = ds.join("web");
    std::fs::create_dir_all(&web).unwrap();
    let raw = sb.path("web.raw");
    make_image(&raw, 32 * MIB, &[(MIB, rng.bytes(2 << 20))]);
    qemu_from_raw(&raw, &web.join("web.vmdk"), "vmdk", "");
    qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "web.vmdk",
        "-F",
        "vmdk",
        web.join("web-000001.vmdk").to_str().unwrap(),
    ]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        web.join("data.vmdk").to_str().unwrap(),
        "16M",
    ]);
    std::fs::write(web.join("web.vmx"), WEB_VMX).unwrap();
    std::fs::write(web.join("web.vmsd"), WEB_VMSD).unwrap();

    // app: an OVA of an OVF naming two streamOptimized disks.
    let app = ds.join("app");
    std::fs::create_dir_all(&app).unwrap();
    let mut members = vec![("app.ovf".to_owned(), app_ovf().into_bytes())];
    for (name, size) in [("app-disk1.vmdk", 24 * MIB), ("app-disk2.vmdk", 8 * MIB)] {
        let raw = sb.path(&format!("{name}.raw"));
        make_image(&raw, size, &[(0, rng.bytes(1 << 20))]);
        let vmdk = sb.path(name);
        qemu_from_raw(&raw, &vmdk, "vmdk", "subformat=streamOptimized");
        members.push((name.to_owned(), std::fs::read(&vmdk).unwrap()));
    }
    let refs: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    std::fs::write(app.join("app.ova"), tar(&refs)).unwrap();

    // Hyper-V: the corpus's configuration in the usual layout, its disk made here.
    let vms = ds.join("hyperv/Virtual Machines");
    let vhds = ds.join("hyperv/Virtual Hard Disks");
    std::fs::create_dir_all(&vms).unwrap();
    std::fs::create_dir_all(&vhds).unwrap();
    std::fs::copy(
        corpus.join("test.vmcx"),
        vms.join("282874FC-59D6-4F30-BC04-5FDD909C82E0.vmcx"),
    )
    .unwrap();
    qemu(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        vhds.join("Other Location.vhdx").to_str().unwrap(),
        "64M",
    ]);

    // The corpus's encrypted VMware VM.
    std::fs::create_dir_all(ds.join("secret")).unwrap();
    std::fs::copy(
        corpus.join("encrypted.vmx"),
        ds.join("secret/encrypted.vmx"),
    )
    .unwrap();

    // Hostile configurations.
    let bad = ds.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let vmcx = std::fs::read(corpus.join("test.vmcx")).unwrap();
    std::fs::write(bad.join("truncated.vmcx"), &vmcx[..0x3800]).unwrap();
    std::fs::write(bad.join("tiny.vmcx"), [0u8; 100]).unwrap();
    std::fs::write(
        bad.join("long.vmx"),
        format!("displayName = \"{}\"\n", "x".repeat(1 << 20)),
    )
    .unwrap();
    std::fs::write(
        bad.join("loop.vmx"),
        "displayName = \"loop\"\ncheckpoint.vmsd = \"loop.vmsd\"\n",
    )
    .unwrap();
    std::fs::write(
        bad.join("loop.vmsd"),
        "snapshot0.uid = \"1\"\nsnapshot0.parent = \"2\"\nsnapshot1.uid = \"2\"\nsnapshot1.parent = \"1\"\n",
    )
    .unwrap();
    std::fs::write(
        bad.join("xxe.ovf"),
        "<?xml version=\"1.0\"?>\n<!DOCTYPE Envelope [<!ENTITY x SYSTEM \"file:///etc/passwd\">]>\n<Envelope><References><File href=\"&x;\" id=\"f\"/></References></Envelope>",
    )
    .unwrap();
    ds
}

#[test]
fn vms_of_a_datastore_are_discovered_with_their_disks_and_chains() {
    let Some(corpus) = crate::corpus::corpus() else {
        return;
    };
    if !have_qemu() {
        return;
    }
    let sb = Sandbox::new();
    let ds = datastore(&sb, &corpus);
    let before = hashes(&ds);
    let v = sb.json(&["discover", ds.to_str().unwrap()]);
    assert_eq!(before, hashes(&ds), "discovery changed a file");
    let vms = v["vms"].as_array().unwrap();

    // web.vmx
    let web = vm_by(vms, "web/web.vmx");
    assert_eq!(web["kind"], "vmx");
    assert_eq!(web["name"], "web \"front\"");
    assert_eq!(web["id"], "421d4a6b-8e4f-6e3a-9c5a-332d520e2b97");
    assert_eq!(web["cpus"], 4);
    assert_eq!(web["memory_bytes"], 8192 * MIB);
    assert_eq!(web["firmware"], "efi");
    assert_eq!(web["secure_boot"], true);
    assert_eq!(web["guest_os"], "debian12-64");
    assert_eq!(web["encrypted"], false);
    let nics = web["nics"].as_array().unwrap();
    assert_eq!(nics.len(), 2, "{nics:?}");
    assert_eq!(nics[0]["kind"], "vmxnet3");
    assert_eq!(nics[0]["mac"], "00:50:56:3f:00:01");
    assert_eq!(nics[0]["mac_static"], true);
    assert_eq!(nics[0]["network"], "VM Network");
    assert_eq!(nics[1]["kind"], "e1000e");
    assert_eq!(nics[1]["mac"], "00:0c:29:aa:bb:cc");
    assert_eq!(nics[1]["network"], "Backup");
    assert_eq!(nics[1]["connected"], false);
    let disks = web["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "the CD-ROM is not a disk: {disks:?}");
    assert_eq!(disks[0]["slot"], "scsi0:0");
    assert_eq!(disks[0]["controller_type"], "pvscsi");
    let chain: Vec<&str> = disks[0]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert!(chain[0].ends_with("web-000001.vmdk") && chain[1].ends_with("web/web.vmdk"));
    assert_eq!(disks[0]["virtual_size"], 32 * MIB);
    assert_eq!(disks[0]["format"], "vmdk");
    assert_eq!(disks[1]["slot"], "sata0:1");
    assert_eq!(disks[1]["controller_type"], "ahci");
    assert!(
        disks[1]["path"]
            .as_str()
            .unwrap()
            .ends_with("web/data.vmdk")
    );
    assert_eq!(disks[1]["virtual_size"], 16 * MIB);
    assert!(disks.iter().all(|d| d["problem"].is_null()), "{disks:?}");
    let snaps = web["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0]["name"], "before upgrade");
    assert_eq!(snaps[1]["parent"], "1");
    assert_eq!(snaps[1]["current"], true);
    assert_eq!(snaps[1]["disks"][0], "web-000001.vmdk");
    assert!(web["warnings"].as_array().unwrap().is_empty(), "{web}");

    // app.ova
    let app = vm_by(vms, "app/app.ova");
    assert_eq!(app["kind"], "ova");
    assert_eq!(app["name"], "app01");
    assert_eq!(app["id"], "app01");
    assert_eq!(app["cpus"], 2);
    assert_eq!(app["memory_bytes"], 4096 * MIB);
    assert_eq!(app["firmware"], "bios");
    assert_eq!(app["guest_os"], "ubuntu64Guest");
    assert_eq!(app["nics"][0]["kind"], "VmxNet3");
    assert_eq!(app["nics"][0]["mac"], "00:50:56:01:02:03");
    assert_eq!(app["nics"][0]["network"], "App Net");
    let disks = app["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for (i, (name, size)) in [("app-disk1.vmdk", 24 * MIB), ("app-disk2.vmdk", 8 * MIB)]
        .into_iter()
        .enumerate()
    {
        assert_eq!(disks[i]["configured_path"], name);
        assert_eq!(disks[i]["ova_disk"], i);
        assert_eq!(disks[i]["controller"], "SCSI Controller 0");
        assert_eq!(disks[i]["controller_type"], "lsilogic");
        assert_eq!(disks[i]["slot"], format!("SCSI Controller 0:{i}"));
        assert_eq!(disks[i]["capacity"], size);
        assert_eq!(disks[i]["virtual_size"], size);
        assert_eq!(disks[i]["format"], "vmdk");
    }

    // The corpus's Hyper-V configuration: a generation 1 VM with one VHDX on IDE 0:0.
    let hv = vm_by(vms, "Machines/282874FC-59D6-4F30-BC04-5FDD909C82E0.vmcx");
    assert_eq!(hv["kind"], "vmcx");
    assert_eq!(hv["name"], "Other Location");
    assert_eq!(hv["id"], "282874FC-59D6-4F30-BC04-5FDD909C82E0");
    assert_eq!(hv["cpus"], 1);
    assert_eq!(hv["memory_bytes"], 1024 * MIB);
    assert_eq!(hv["firmware"], "bios");
    assert_eq!(hv["secure_boot"], false);
    assert_eq!(hv["encrypted"], false);
    assert_eq!(hv["nics"][0]["name"], "Network Adapter");
    assert_eq!(hv["nics"][0]["kind"], "synthetic");
    assert_eq!(hv["nics"][0]["mac_static"], false);
    let disk = &hv["disks"][0];
    assert_eq!(disk["slot"], "ide0:0");
    assert_eq!(
        disk["configured_path"],
        "C:\\Users\\Public\\Documents\\Hyper-V\\Virtual Hard Disks\\Other Location.vhdx"
    );
    assert!(
        disk["path"]
            .as_str()
            .unwrap()
            .ends_with("hyperv/Virtual Hard Disks/Other Location.vhdx")
    );
    assert_eq!(disk["format"], "vhdx");
    assert_eq!(disk["virtual_size"], 64 * MIB);

    // The corpus's encrypted VMware VM: named, said encrypted, nothing guessed.
    let enc = vm_by(vms, "secret/encrypted.vmx");
    assert_eq!(enc["name"], "Encrypted VM");
    assert_eq!(enc["encrypted"], true);
    assert!(enc["cpus"].is_null() && enc["firmware"].is_null(), "{enc}");

    // Hostile files: each its own error or warning, the rest listed.
    let err = |name: &str| {
        let vm = vm_by(vms, name);
        vm["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        err("bad/truncated.vmcx").contains("truncated.vmcx"),
        "{}",
        err("bad/truncated.vmcx")
    );
    assert!(err("bad/tiny.vmcx").contains("not a Hyper-V configuration"));
    assert!(
        err("bad/long.vmx").contains("line 1 is 1048592 bytes long"),
        "{}",
        err("bad/long.vmx")
    );
    assert!(
        err("bad/xxe.ovf").contains("document type declaration"),
        "{}",
        err("bad/xxe.ovf")
    );
    let lp = vm_by(vms, "bad/loop.vmx");
    assert!(lp["error"].is_null());
    assert!(
        lp["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("loop")),
        "{lp}"
    );
    assert_eq!(vms.len(), 9, "{vms:#?}");

    // CSV: a row per disk (a VM with none, or unreadable, has one), the header first.
    let csv = sb.ok(&["discover", ds.to_str().unwrap(), "--csv"]);
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("vm,vm_id,config,kind,cpus,memory_bytes,firmware"));
    assert_eq!(rows.len(), 1 + 2 + 2 + 1 + 1 + 5, "{csv}");
    let web_rows: Vec<&&str> = rows.iter().filter(|r| r.contains("web/web.vmx")).collect();
    assert_eq!(web_rows.len(), 2);
    assert!(
        web_rows[0].starts_with("\"web \"\"front\"\"\",421d4a6b-8e4f-6e3a-9c5a-332d520e2b97,"),
        "{}",
        web_rows[0]
    );
    assert!(
        web_rows[0].contains(",scsi0,pvscsi,scsi0:0,") && web_rows[0].contains(",vmdk,33554432,")
    );

    // Text names each VM and the hostile files' problems.
    let text = sb.ok(&["discover", ds.to_str().unwrap()]);
    for needle in [
        "VM ",
        "Other Location",
        "app01",
        "encrypted  yes",
        "scsi0:0 (pvscsi)",
        "error: ",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

/// The `.vmcx` parser on 2000 damaged copies of the corpus's file (bytes flipped in the
/// headers, object table and key tables; truncations): an error or a tree, never a panic,
/// quickly.
#[test]
fn damaged_vmcx_files_fail_cleanly() {
    let Some(corpus) = crate::corpus::corpus() else {
        return;
    };
    let good = std::fs::read(corpus.join("test.vmcx")).unwrap();
    let tree = blockferry::internals::vm::VmcxFile::parse("test.vmcx", good.clone()).unwrap();
    assert!(
        tree.root
            .at(&["configuration", "properties", "name"])
            .is_some()
    );
    let mut rng = Rng::seeded("damaged_vmcx");
    let started = std::time::Instant::now();
    let mut refused = 0;
    for i in 0..2000 {
        let mut bad = good.clone();
        if i % 10 == 0 {
            bad.truncate(rng.below(good.len() as u64) as usize);
        } else {
            // Mostly the structures (the first 0x14000 bytes hold the headers and tables).
            for _ in 0..=rng.below(8) {
                let at = rng.below(0x14000.min(bad.len() as u64)) as usize;
                bad[at] ^= 1 << rng.below(8);
            }
        }
        if blockferry::internals::vm::VmcxFile::parse("bad.vmcx", bad).is_err() {
            refused += 1;
        }
    }
    assert!(
        refused > 100,
        "only {refused} of 2000 damaged files refused"
    );
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
}
