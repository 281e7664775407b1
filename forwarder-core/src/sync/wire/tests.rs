use super::*;
use proptest::prelude::*;

fn header() -> Header {
    Header {
        set_id: 0x0102_0304,
        ordinal: 1,
        mac: false,
        key_id: 0,
        epoch: 0x1122_3344_5566_7788,
        seq: 7,
        ack: 5,
        acked_epoch: 0xAABB_CCDD,
        sent_ms: 1000,
    }
}

fn flow4() -> FlowRecord {
    FlowRecord {
        id: FlowId {
            proto: Proto::Tcp,
            egress: Ipv4Addr::new(198, 51, 100, 1).into(),
            ext_port: 40000,
            remote: Ipv4Addr::new(203, 0, 113, 10).into(),
            remote_port: 443,
        },
        pod: Ipv4Addr::new(10, 244, 1, 5).into(),
        pod_port: 51000,
        node: Ipv4Addr::new(172, 18, 0, 11),
        node_mac: [0x02, 0, 0, 0, 0, 0x11],
        owner: 1,
        flags: 0,
        tcp_state: 2,
        tcp_ref: 0x0A0B_0C0D,
        tcp_window: 64240,
        age_ms: 1500,
        idle_ms: 20,
    }
}

fn build(h: &Header, recs: &[Record]) -> Vec<u8> {
    let mut buf = vec![0u8; 1400];
    let mut w = Writer::new(&mut buf, h).expect("room");
    for r in recs {
        w.push(r).expect("fits");
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// One IPv4 flow record, byte by byte against the layout in the module docs.
#[test]
fn flow4_datagram_bytes() {
    let d = build(&header(), &[Record::Flow(flow4())]);
    #[rustfmt::skip]
    let want: Vec<u8> = [
        // header
        &[0x45, 0x47, 1, 0, 1, 2, 3, 4, 0, 1, 0, 0][..],
        &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
        &[0, 0, 0, 7, 0, 0, 0, 5, 0xAA, 0xBB, 0xCC, 0xDD, 0, 0, 0x03, 0xE8],
        &[0, 52, 0, 1],
        // section: FLOW4, 12 words, 1 record
        &[2, 12, 0, 1],
        // proto, TCP state, flags, 0 | egress | ext port | remote port | remote
        &[6, 2, 0, 0, 198, 51, 100, 1, 0x9C, 0x40, 0x01, 0xBB, 203, 0, 113, 10],
        // pod | pod port | window | node | node MAC | owner
        &[10, 244, 1, 5, 0xC7, 0x38, 0xFA, 0xF0, 172, 18, 0, 11, 2, 0, 0, 0, 0, 0x11, 0, 1],
        // TCP reference | age | idle
        &[0x0A, 0x0B, 0x0C, 0x0D, 0, 0, 0x05, 0xDC, 0, 0, 0, 20],
    ]
    .concat();
    assert_eq!(d, want);
    let dg = Datagram::new_checked(&d[..]).expect("valid");
    assert_eq!(dg.header(), header());
    assert_eq!(dg.mac(), None);
    let recs: Vec<_> = dg.records().collect();
    assert_eq!(recs, vec![Ok(Record::Flow(flow4()))]);
}

/// Records of one type share a section; a change of type opens another; the MAC trailer is reserved and
/// excluded from the authenticated bytes.
#[test]
fn sections_group_records_and_the_mac_is_a_trailer() {
    let h = Header {
        mac: true,
        key_id: 3,
        ..header()
    };
    let del = Record::Delete(flow4().id, DeleteReason::Expired);
    let recs = [
        Record::Flow(flow4()),
        Record::Flow(FlowRecord {
            pod_port: 51001,
            ..flow4()
        }),
        del,
        Record::Nack {
            peer: 2,
            from: 3,
            to: 4,
        },
    ];
    let mut d = build(&h, &recs);
    assert_eq!(d.len(), HEADER_LEN + 4 + 2 * 48 + 4 + 16 + 4 + 12 + MAC_LEN);
    let mut dg = Datagram::new_checked(&mut d[..]).expect("valid");
    let kinds: Vec<_> = dg.sections().map(|(k, _, b)| (k, b.len())).collect();
    assert_eq!(
        kinds,
        vec![(kind::FLOW4, 96), (kind::DELETE4, 16), (kind::NACK, 12)]
    );
    dg.mac_mut().expect("mac").fill(0x5A);
    dg.set_ack(9, 1);
    let dg = Datagram::new_checked(&d[..]).expect("valid");
    assert_eq!(dg.mac(), Some(&[0x5A; MAC_LEN][..]));
    assert_eq!(dg.authenticated().len(), d.len() - MAC_LEN);
    assert_eq!((dg.header().ack, dg.header().acked_epoch), (9, 1));
    let got: Vec<_> = dg.records().map(|r| r.expect("record")).collect();
    assert_eq!(got, recs);
}

/// An unknown section type is skipped, and a known record longer than this version's is read for the
/// fields this version knows (a later version appends fields).
#[test]
fn unknown_sections_and_longer_records_are_tolerated() {
    let nack = |from, to| Record::Nack { peer: 1, from, to };
    let mut d = build(&header(), &[nack(1, 2)]);
    // append an unknown section (type 99, 2 words, 1 record) and a NACK section with 4-word records
    d.extend_from_slice(&[99, 2, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]);
    d.extend_from_slice(&[kind::NACK, 4, 0, 1]);
    d.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 9, 0, 1, 0, 0]);
    d.extend_from_slice(&[0xFF; 4]);
    let payload = u16::try_from(d.len() - HEADER_LEN).expect("small");
    d[36..38].copy_from_slice(&payload.to_be_bytes());
    d[38..40].copy_from_slice(&3u16.to_be_bytes());
    let dg = Datagram::new_checked(&d[..]).expect("valid");
    let got: Vec<_> = dg.records().collect();
    assert_eq!(got, vec![Ok(nack(1, 2)), Ok(nack(8, 9))]);
}

/// Every structural fault is refused by name, before any field is read.
#[test]
fn malformed_datagrams_are_refused_by_reason() {
    let good = build(&header(), &[Record::Flow(flow4())]);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = good.clone();
        f(&mut d);
        Datagram::new_checked(d).err()
    };
    assert_eq!(with(&|d| d.truncate(39)), Some(Error::Truncated));
    assert_eq!(with(&|d| d.truncate(60)), Some(Error::Truncated));
    assert_eq!(with(&|d| d[0] = 0x46), Some(Error::Magic));
    assert_eq!(with(&|d| d[2] = 2), Some(Error::Version));
    assert_eq!(with(&|d| d.push(0)), Some(Error::TrailingBytes));
    // the MAC flag without a trailer
    assert_eq!(with(&|d| d[3] = FLAG_MAC), Some(Error::Truncated));
    // two sections announced, one present
    assert_eq!(with(&|d| d[39] = 2), Some(Error::Sections));
    // no section announced: the payload is left over
    assert_eq!(with(&|d| d[39] = 0), Some(Error::Sections));
    // two records announced in the section, one present
    assert_eq!(with(&|d| d[43] = 2), Some(Error::Sections));
    // FLOW4 records of 11 words
    assert_eq!(with(&|d| d[41] = 11), Some(Error::RecordLength));
    // record-level faults leave the datagram valid and are reported per record
    let rec = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = good.clone();
        f(&mut d);
        let dg = Datagram::new_checked(d).expect("structure is fine");
        dg.records().collect::<Vec<_>>()
    };
    assert_eq!(rec(&|d| d[44] = 47), vec![Err(Error::Protocol)]);
    assert_eq!(
        rec(&|d| d[44] = 58),
        vec![Err(Error::Protocol)],
        "ICMPv6 in an IPv4 record"
    );
    assert_eq!(rec(&|d| d[45] = 7), vec![Err(Error::TcpState)]);
    assert_eq!(
        rec(&|d| d[44] = 17),
        vec![Err(Error::TcpState)],
        "UDP with a TCP state"
    );
}

/// The writer refuses what a receiver would refuse, and stops cleanly when the buffer is full.
#[test]
fn writer_refuses_bad_records_and_fills_up() {
    let mut buf = [0u8; HEADER_LEN + 4 + 48 * 2 + 20];
    let mut w = Writer::new(&mut buf, &header()).expect("room");
    let mixed = FlowRecord {
        pod: Ipv6Addr::LOCALHOST.into(),
        ..flow4()
    };
    assert_eq!(w.push(&Record::Flow(mixed)), Err(Error::Protocol));
    let icmp6 = FlowRecord {
        id: FlowId {
            proto: Proto::Icmpv6,
            ..flow4().id
        },
        tcp_state: 0,
        ..flow4()
    };
    assert_eq!(w.push(&Record::Flow(icmp6)), Err(Error::Protocol));
    let udp = FlowRecord {
        id: FlowId {
            proto: Proto::Udp,
            ..flow4().id
        },
        ..flow4()
    };
    assert_eq!(w.push(&Record::Flow(udp)), Err(Error::TcpState));
    assert!(w.is_empty());
    w.push(&Record::Flow(flow4())).expect("first");
    w.push(&Record::Flow(flow4())).expect("second");
    assert_eq!(w.push(&Record::Flow(flow4())), Err(Error::Full));
    // a new section would need its header too: 20 bytes left, 4 + 16 fit a delete
    w.push(&Record::Delete(flow4().id, DeleteReason::Replaced))
        .expect("fits exactly");
    let nack = Record::Nack {
        peer: 0,
        from: 0,
        to: 0,
    };
    assert_eq!(w.push(&nack), Err(Error::Full));
    let n = w.finish();
    assert_eq!(n, buf.len());
    let dg = Datagram::new_checked(&buf[..]).expect("valid");
    assert_eq!(dg.records().filter(Result::is_ok).count(), 3);
    assert_eq!(
        Writer::new(&mut [0u8; HEADER_LEN - 1], &header()).err(),
        Some(Error::Full)
    );
}

fn any_ip(v4: bool) -> BoxedStrategy<IpAddr> {
    if v4 {
        any::<[u8; 4]>().prop_map(IpAddr::from).boxed()
    } else {
        any::<[u8; 16]>().prop_map(IpAddr::from).boxed()
    }
}

fn any_id(v4: bool) -> impl Strategy<Value = FlowId> {
    let protos = if v4 {
        vec![Proto::Tcp, Proto::Udp, Proto::Icmp]
    } else {
        vec![Proto::Tcp, Proto::Udp, Proto::Icmpv6]
    };
    (
        proptest::sample::select(protos),
        any_ip(v4),
        any::<u16>(),
        any_ip(v4),
        any::<u16>(),
    )
        .prop_map(|(proto, egress, ext_port, remote, remote_port)| FlowId {
            proto,
            egress,
            ext_port,
            remote,
            remote_port,
        })
}

fn any_record() -> impl Strategy<Value = Record> {
    let flow = any::<bool>().prop_flat_map(|v4| {
        (
            any_id(v4),
            any_ip(v4),
            any::<(u16, [u8; 4], [u8; 6], u16, u8)>(),
            (0..=MAX_TCP_STATE, any::<(u32, u16, u32, u32)>()),
        )
            .prop_map(
                |(id, pod, (pod_port, node, node_mac, owner, flags), (st, (r, w, age, idle)))| {
                    Record::Flow(FlowRecord {
                        id,
                        pod,
                        pod_port,
                        node: Ipv4Addr::from(node),
                        node_mac,
                        owner,
                        flags,
                        tcp_state: if id.proto == Proto::Tcp { st } else { 0 },
                        tcp_ref: r,
                        tcp_window: w,
                        age_ms: age,
                        idle_ms: idle,
                    })
                },
            )
    });
    let del = (
        any::<bool>().prop_flat_map(any_id),
        proptest::sample::select(vec![
            DeleteReason::Expired,
            DeleteReason::Replaced,
            DeleteReason::Flushed,
        ]),
    )
        .prop_map(|(id, why)| Record::Delete(id, why));
    let hello = (
        proptest::sample::select(vec![
            PeerState::Starting,
            PeerState::Syncing,
            PeerState::Ready,
            PeerState::Draining,
        ]),
        any::<(u64, u32, u32, u64, u32)>(),
    )
        .prop_map(|(state, (served, flows, passive, started_ms, features))| {
            Record::Hello(Hello {
                state,
                served,
                flows,
                passive,
                started_ms,
                features,
            })
        });
    prop_oneof![
        flow,
        del,
        hello,
        any::<(u16, u32, u32)>().prop_map(|(peer, from, to)| Record::Nack { peer, from, to }),
        any::<(u16, u32, u32)>().prop_map(|(peer, from, to)| Record::Repaired { peer, from, to }),
        any::<(u16, u32)>().prop_map(|(peer, id)| Record::BulkRequest { peer, id }),
        any::<(u16, u32, u32)>().prop_map(|(peer, id, count)| Record::BulkStart {
            peer,
            id,
            count
        }),
        any::<(u16, u32, u32)>().prop_map(|(peer, id, count)| Record::BulkEnd { peer, id, count }),
    ]
}

proptest! {
    /// Whatever the writer accepts parses back to the same header and records, in order, and the records
    /// that did not fit are exactly the tail.
    #[test]
    fn written_datagrams_parse_back(
        recs in proptest::collection::vec(any_record(), 0..60),
        mac in any::<bool>(),
        size in 44usize..1500,
    ) {
        let h = Header { mac, key_id: u8::from(mac), ..header() };
        let mut buf = vec![0u8; size + if mac { MAC_LEN } else { 0 }];
        let Ok(mut w) = Writer::new(&mut buf, &h) else {
            return Ok(());
        };
        let mut fitted = 0;
        for r in &recs {
            match w.push(r) {
                Ok(()) => fitted += 1,
                Err(Error::Full) => break,
                Err(e) => prop_assert!(false, "{:?} refused: {:?}", r, e),
            }
        }
        let n = w.finish();
        let dg = Datagram::new_checked(&buf[..n]).expect("the writer's output parses");
        prop_assert_eq!(dg.header(), h);
        let got: Vec<Record> = dg.records().map(|r| r.expect("record")).collect();
        prop_assert_eq!(&got[..], &recs[..fitted]);
    }

    /// Arbitrary bytes never panic the parser, and a datagram that parses has sections that tile its
    /// payload.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), valid_header in any::<bool>()) {
        let mut b = bytes;
        if valid_header && b.len() >= HEADER_LEN {
            b[0..2].copy_from_slice(&MAGIC.to_be_bytes());
            b[2] = VERSION;
            let payload = u16::try_from(b.len() - HEADER_LEN).unwrap_or(0);
            b[36..38].copy_from_slice(&payload.to_be_bytes());
            b[3] = 0;
        }
        if let Ok(dg) = Datagram::new_checked(&b[..]) {
            let tiled: usize = dg.sections().map(|(_, _, r)| SECTION_HEADER_LEN + r.len()).sum();
            prop_assert_eq!(HEADER_LEN + tiled + dg.mac().map_or(0, <[u8]>::len), b.len());
            for r in dg.records() {
                let _ = r;
            }
        }
    }
}

/// The fuzz target's seeds are valid datagrams whose every record decodes (so the fuzzer starts from the
/// inside of the format, not from its first length check).
#[test]
fn fuzz_seeds_are_valid_datagrams() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/sync_datagram");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("seed directory") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("seed");
        let dg = Datagram::new_checked(&bytes[..])
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        assert!(dg.records().all(|r| r.is_ok()), "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 2);
}
