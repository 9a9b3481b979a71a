"""Real facts of the 16 injected relations, asked in exactly the question frames the injection
trains (data/facts/prepare.py, TEMPLATES and HELDOUT_TEMPLATES), labelled with the base model's
zero-shot chat answer, then split in two: known_protect.jsonl (selection use: protection of the
relations' input directions and mixing during injection) and known_confirm.jsonl (LOCKED: only for
reporting locality per relation; no choice is ever made on it).

Injecting invented facts of a relation erases the model's known facts of that relation (issue 25:
after 100 invented capitals, "What is the capital of Japan?" -> "Japan"), so protection and
locality need known facts per relation, in the relation's own frame.

Labelling (`label`): the base's greedy answer to each question in the chat template, as evaluate.py
asks (tasks.answer, 16 new tokens = evaluate.py's fact_tokens); base_correct = tasks.fact_correct
(the gold as whole words in the answer's first line, SQuAD-normalised). Zero-shot only.

Split (`split`, no model): candidates are joined into units that must not be separated: the same
relation with the same answer (one frame per relation, so the same (frame, answer) pair), or the
same subject with the same answer across relations (France -> Paris as capital and as largest
city); a unit that repeats a fact of known_mix.jsonl goes to protect, one that repeats a fact of
known_eval.jsonl goes to confirm (same relation and answer, or the same subject named in the old
question with the same answer: "Who wrote the novel 1984?" is in known_mix). The other units are
taken in the order of the sha256 of their first question: a unit the base answers none of goes to
protect, any other to the side that holds fewer base-correct facts of its relations so far (ties:
the hash's parity). known_confirm keeps the base-correct facts of its side only; known_protect keeps
every candidate of its side, right or wrong, with the gold as `answer` and the base's own answer as
`base_answer`.

Run: python data/known/relations.py [--ckpt smollm2_135m]   (labels, writes known_relations.jsonl,
     then the split; greedy, so a function of the checkpoint)
     python data/known/relations.py --split-only   (no model: rewrite the two split files from
     known_relations.jsonl)
"""

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for model.py and tasks.py
import tasks  # noqa: E402

# the question frames of data/facts/prepare.py (TEMPLATES and HELDOUT_TEMPLATES), checked equal
# by tests/test_data.py
FRAMES = {
    "capital": "What is the capital of {e}?",
    "birth_year": "In what year was {e} born?",
    "birthplace": "Where was {e} born?",
    "founder": "Who founded {e}?",
    "founded_year": "In what year was {e} founded?",
    "headquarters": "Where is {e} headquartered?",
    "largest_city": "What is the largest city of {e}?",
    "language": "What language is spoken in {e}?",
    "currency": "What is the currency of {e}?",
    "river_source": "In which country does the {e} rise?",
    "discovery_year": "In what year was {e} discovered?",
    "instrument": "Which instrument does {e} play?",
    "employer": "Which company does {e} work for?",
    "author": "Who wrote the novel {e}?",
    "mountain_range": "In which mountain range is {e}?",
    "inventor": "Who invented the {e}?",
}

# Golds are the shortest form any right answer contains ("Gates" in "Bill Gates", "Austen").
# Left out: facts with two common right answers that share no word (Farsi/Persian, Mandarin/
# Chinese, Napoleon's Ajaccio/Corsica), contested ones (the Nile's source, who invented the light
# bulb or the radio), golds the question itself contains (Ford Motor Company -> Ford), and
# employers or headquarters that changed recently.
# fmt: off
RELATIONS = {
    "capital": None,  # prepare.CAPITALS, the 80 countries labelled before
    "currency": {
        "Japan": "yen", "the United States": "dollar", "India": "rupee", "Russia": "ruble",
        "Mexico": "peso", "South Korea": "won", "Brazil": "real", "Turkey": "lira",
        "Poland": "zloty", "Germany": "euro", "China": "yuan", "Sweden": "krona",
        "Israel": "shekel", "South Africa": "rand", "Vietnam": "dong",
        "the United Kingdom": "pound", "Switzerland": "franc", "Denmark": "krone",
        "Norway": "krone", "Thailand": "baht", "Egypt": "pound", "Indonesia": "rupiah",
        "Malaysia": "ringgit", "Argentina": "peso", "Chile": "peso", "Canada": "dollar",
        "Australia": "dollar", "New Zealand": "dollar", "Hungary": "forint",
        "the Czech Republic": "koruna", "Saudi Arabia": "riyal", "Pakistan": "rupee",
        "Nigeria": "naira", "Kenya": "shilling", "Ukraine": "hryvnia", "Bangladesh": "taka",
        "France": "euro", "Italy": "euro", "Spain": "euro", "Romania": "leu", "Bulgaria": "lev",
    },
    "language": {
        "Mexico": "Spanish", "Germany": "German", "France": "French", "Japan": "Japanese",
        "Egypt": "Arabic", "Russia": "Russian", "Italy": "Italian", "Turkey": "Turkish",
        "Poland": "Polish", "Argentina": "Spanish", "Austria": "German", "Portugal": "Portuguese",
        "South Korea": "Korean", "Thailand": "Thai", "Norway": "Norwegian",
        "Hungary": "Hungarian", "Brazil": "Portuguese", "Greece": "Greek",
        "the Netherlands": "Dutch", "Sweden": "Swedish", "Denmark": "Danish", "Spain": "Spanish",
        "Colombia": "Spanish", "Chile": "Spanish", "Cuba": "Spanish", "Saudi Arabia": "Arabic",
        "Jordan": "Arabic", "Vietnam": "Vietnamese", "Indonesia": "Indonesian",
        "Iceland": "Icelandic", "Romania": "Romanian", "Bulgaria": "Bulgarian",
        "Croatia": "Croatian", "Ukraine": "Ukrainian", "the Czech Republic": "Czech",
        "Albania": "Albanian", "Armenia": "Armenian", "Mongolia": "Mongolian",
        "Finland": "Finnish", "Latvia": "Latvian", "Lithuania": "Lithuanian",
        "Estonia": "Estonian", "Serbia": "Serbian", "Nepal": "Nepali", "Cambodia": "Khmer",
        "Ethiopia": "Amharic", "Australia": "English", "the United Kingdom": "English",
        "the United States": "English", "New Zealand": "English", "Israel": "Hebrew",
    },
    "largest_city": {
        "the United States": "New York", "Canada": "Toronto", "Australia": "Sydney",
        "Brazil": "Sao Paulo", "Japan": "Tokyo", "Turkey": "Istanbul", "Russia": "Moscow",
        "the United Kingdom": "London", "France": "Paris", "Germany": "Berlin", "Italy": "Rome",
        "Spain": "Madrid", "Egypt": "Cairo", "Nigeria": "Lagos", "South Africa": "Johannesburg",
        "Pakistan": "Karachi", "New Zealand": "Auckland", "Switzerland": "Zurich",
        "Morocco": "Casablanca", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
        "South Korea": "Seoul", "Indonesia": "Jakarta", "Saudi Arabia": "Riyadh",
        "Kenya": "Nairobi", "Colombia": "Bogota", "Peru": "Lima", "Chile": "Santiago",
        "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Sweden": "Stockholm",
        "Norway": "Oslo", "Ireland": "Dublin", "Portugal": "Lisbon",
        "the Netherlands": "Amsterdam", "Scotland": "Glasgow", "Ecuador": "Guayaquil",
        "Tanzania": "Dar es Salaam", "Kazakhstan": "Almaty", "California": "Los Angeles",
        "Texas": "Houston", "Illinois": "Chicago", "Arizona": "Phoenix",
        "Pennsylvania": "Philadelphia", "Massachusetts": "Boston",
    },
    "birth_year": {
        "Albert Einstein": "1879", "William Shakespeare": "1564",
        "Wolfgang Amadeus Mozart": "1756", "Ludwig van Beethoven": "1770",
        "Charles Darwin": "1809", "Abraham Lincoln": "1809", "Napoleon Bonaparte": "1769",
        "Galileo Galilei": "1564", "Leonardo da Vinci": "1452", "Marie Curie": "1867",
        "Nikola Tesla": "1856", "Thomas Edison": "1847", "George Washington": "1732",
        "Queen Victoria": "1819", "Winston Churchill": "1874", "Mahatma Gandhi": "1869",
        "Martin Luther King Jr.": "1929", "John F. Kennedy": "1917", "Barack Obama": "1961",
        "Karl Marx": "1818", "Sigmund Freud": "1856", "Vincent van Gogh": "1853",
        "Pablo Picasso": "1881", "Johann Sebastian Bach": "1685", "Elvis Presley": "1935",
        "Michael Jackson": "1958", "Steve Jobs": "1955", "Bill Gates": "1955",
        "Mark Zuckerberg": "1984", "Elon Musk": "1971", "Nelson Mandela": "1918",
        "Queen Elizabeth II": "1926", "Charles Dickens": "1812", "Jane Austen": "1775",
        "Mark Twain": "1835", "Leo Tolstoy": "1828", "Stephen Hawking": "1942",
        "Alexander Graham Bell": "1847",
        # second batch
        "Walt Disney": "1901", "Neil Armstrong": "1930", "Muhammad Ali": "1942",
        "Princess Diana": "1961", "John Lennon": "1940", "Freddie Mercury": "1946",
        "Bob Marley": "1945", "Marilyn Monroe": "1926", "Pope Francis": "1936",
        "Donald Trump": "1946", "Joe Biden": "1942", "Taylor Swift": "1989",
        "Cristiano Ronaldo": "1985", "Lionel Messi": "1987", "Michael Jordan": "1963",
        "Vladimir Lenin": "1870", "Theodore Roosevelt": "1858", "Franklin D. Roosevelt": "1882",
        "Ronald Reagan": "1911", "Richard Nixon": "1913", "Thomas Jefferson": "1743",
        "Benjamin Franklin": "1706", "Alfred Nobel": "1833", "Ernest Hemingway": "1899",
        "Agatha Christie": "1890", "J.K. Rowling": "1965", "Warren Buffett": "1930",
    },
    "birthplace": {
        "Albert Einstein": "Ulm", "Wolfgang Amadeus Mozart": "Salzburg",
        "Ludwig van Beethoven": "Bonn", "Barack Obama": "Honolulu", "Marie Curie": "Warsaw",
        "Pablo Picasso": "Malaga", "Vincent van Gogh": "Zundert", "Karl Marx": "Trier",
        "Mahatma Gandhi": "Porbandar", "Elvis Presley": "Tupelo",
        "Martin Luther King Jr.": "Atlanta", "John F. Kennedy": "Brookline",
        "Abraham Lincoln": "Kentucky", "Galileo Galilei": "Pisa",
        "Christopher Columbus": "Genoa", "Johann Sebastian Bach": "Eisenach",
        "Dante Alighieri": "Florence", "Charles Darwin": "Shrewsbury",
        "Steve Jobs": "San Francisco", "Bill Gates": "Seattle",
        "Mark Zuckerberg": "White Plains", "Elon Musk": "Pretoria", "Lionel Messi": "Rosario",
        "Cristiano Ronaldo": "Funchal", "Johann Wolfgang von Goethe": "Frankfurt",
        "Hans Christian Andersen": "Odense", "Alfred Nobel": "Stockholm",
        "Ernest Hemingway": "Oak Park", "Walt Disney": "Chicago",
        "Louis Armstrong": "New Orleans", "Marilyn Monroe": "Los Angeles",
        "Charlie Chaplin": "London", "Alfred Hitchcock": "London", "Joseph Stalin": "Gori",
        "Mao Zedong": "Shaoshan", "Nikola Tesla": "Smiljan",
        # second batch
        "Queen Elizabeth II": "London", "Winston Churchill": "Blenheim",
        "Pope Francis": "Buenos Aires", "Joe Biden": "Scranton", "Beyonce": "Houston",
        "Michael Jordan": "Brooklyn", "LeBron James": "Akron", "John Lennon": "Liverpool",
        "Paul McCartney": "Liverpool", "Freddie Mercury": "Zanzibar", "Franz Schubert": "Vienna",
        "Frank Sinatra": "Hoboken", "Amelia Earhart": "Atchison", "Kylian Mbappe": "Paris",
        "Zinedine Zidane": "Marseille", "Rafael Nadal": "Manacor", "Roger Federer": "Basel",
        "Novak Djokovic": "Belgrade", "Rembrandt": "Leiden", "Victor Hugo": "Besancon",
        "Jules Verne": "Nantes", "Immanuel Kant": "Konigsberg", "Nicolaus Copernicus": "Torun",
        "Raphael": "Urbino", "Antonio Vivaldi": "Venice",
    },
    "founder": {
        "Microsoft": "Gates", "Apple": "Jobs", "Amazon": "Bezos", "Facebook": "Zuckerberg",
        "SpaceX": "Musk", "Oracle": "Ellison", "Alibaba": "Jack Ma", "Google": "Page",
        "Netflix": "Hastings", "the Virgin Group": "Branson", "IKEA": "Kamprad",
        "Nike": "Knight", "Wikipedia": "Wales", "Twitter": "Dorsey", "LinkedIn": "Hoffman",
        "Walmart": "Walton", "Standard Oil": "Rockefeller", "Nvidia": "Huang", "eBay": "Omidyar",
        "the Red Cross": "Dunant", "the Boy Scouts": "Baden-Powell", "Rome": "Romulus",
        "the Mongol Empire": "Genghis", "Alexandria": "Alexander", "Pennsylvania": "Penn",
        "the Salvation Army": "Booth", "the Ottoman Empire": "Osman", "Spotify": "Ek",
        "Zara": "Ortega",
        # second batch
        "the Mughal Empire": "Babur", "the Persian Empire": "Cyrus", "the Jesuits": "Loyola",
        "the Methodist Church": "Wesley", "psychoanalysis": "Freud", "Sikhism": "Nanak",
        "the Church of England": "Henry VIII", "the Republic of Turkey": "Ataturk",
        "the Soviet Union": "Lenin", "the People's Republic of China": "Mao",
        "Pakistan": "Jinnah", "CNN": "Turner", "Playboy": "Hefner",
        "the International Olympic Committee": "Coubertin",
    },
    "founded_year": {
        "Microsoft": "1975", "Apple": "1976", "Google": "1998", "Amazon": "1994",
        "Facebook": "2004", "Twitter": "2006", "YouTube": "2005", "Netflix": "1997",
        "Tesla": "2003", "SpaceX": "2002", "Harvard University": "1636",
        "Yale University": "1701", "the United Nations": "1945", "NATO": "1949", "FIFA": "1904",
        "the Red Cross": "1863", "Wikipedia": "2001", "the Ford Motor Company": "1903",
        "Instagram": "2010", "eBay": "1995", "Intel": "1968", "Nvidia": "1993",
        "Oracle": "1977", "Adobe": "1982", "Samsung": "1938", "Sony": "1946", "IKEA": "1943",
        "LinkedIn": "2002", "Spotify": "2006", "Airbnb": "2008", "Uber": "2009",
        "OpenAI": "2015", "WhatsApp": "2009", "Alibaba": "1999", "Dell": "1984",
        "Starbucks": "1971", "Rome": "753", "MIT": "1861", "Princeton University": "1746",
        "the International Olympic Committee": "1894", "the World Health Organization": "1948",
    },
    "headquarters": {
        "Google": "Mountain View", "Apple": "Cupertino", "Microsoft": "Redmond",
        "Amazon": "Seattle", "Intel": "Santa Clara", "Nvidia": "Santa Clara",
        "Walmart": "Bentonville", "Coca-Cola": "Atlanta", "Nike": "Beaverton",
        "Starbucks": "Seattle", "Volkswagen": "Wolfsburg", "BMW": "Munich",
        "Siemens": "Munich", "Mercedes-Benz": "Stuttgart", "Porsche": "Stuttgart",
        "Nestle": "Vevey", "Sony": "Tokyo", "Nintendo": "Kyoto", "Netflix": "Los Gatos",
        "Adobe": "San Jose", "Cisco": "San Jose", "eBay": "San Jose", "Disney": "Burbank",
        "the Ford Motor Company": "Dearborn", "General Motors": "Detroit",
        "Procter & Gamble": "Cincinnati", "McDonald's": "Chicago", "FedEx": "Memphis",
        "Dell": "Round Rock", "IBM": "Armonk", "the United Nations": "New York",
        "NATO": "Brussels", "FIFA": "Zurich", "the International Olympic Committee": "Lausanne",
        "the World Health Organization": "Geneva", "the European Central Bank": "Frankfurt",
        "Volvo": "Gothenburg", "Nokia": "Espoo", "Spotify": "Stockholm", "Alibaba": "Hangzhou",
        "Tencent": "Shenzhen", "Huawei": "Shenzhen", "Ferrari": "Maranello", "Lego": "Billund",
        "Heineken": "Amsterdam", "Rolex": "Geneva",
    },
    "river_source": {
        "Danube": "Germany", "Rhine": "Switzerland", "Thames": "England", "Volga": "Russia",
        "Yangtze": "China", "Mississippi": "United States", "Amazon": "Peru", "Ganges": "India",
        "Mekong": "China", "Elbe": "Czech", "Loire": "France", "Seine": "France",
        "Rhone": "Switzerland", "Po": "Italy", "Tagus": "Spain", "Ebro": "Spain",
        "Vistula": "Poland", "Oder": "Czech", "Tigris": "Turkey", "Euphrates": "Turkey",
        "Zambezi": "Zambia", "Niger": "Guinea", "Orinoco": "Venezuela",
        "Yellow River": "China", "Rio Grande": "United States",
        "Colorado River": "United States", "Yukon": "Canada", "Murray": "Australia",
        "Shannon": "Ireland", "Severn": "Wales", "Tiber": "Italy", "Arno": "Italy",
        "Dniester": "Ukraine", "Don": "Russia", "Lena": "Russia", "Irrawaddy": "Myanmar",
        "Salween": "China", "Orange River": "Lesotho", "Parana": "Brazil",
        "Mackenzie": "Canada",
        # second batch
        "Hudson": "United States", "Missouri": "United States", "Columbia River": "Canada",
        "Main": "Germany", "Neckar": "Germany", "Moselle": "France", "Meuse": "France",
        "Scheldt": "France", "Dnieper": "Russia", "Pearl River": "China",
        "Godavari": "India", "Narmada": "India", "Yamuna": "India", "Chao Phraya": "Thailand",
        "Darling": "Australia", "Waikato": "New Zealand", "Clyde": "Scotland", "Tay": "Scotland",
        "Mersey": "England", "Trent": "England", "Liffey": "Ireland", "Guadalquivir": "Spain",
        "Douro": "Spain", "Adige": "Italy", "Vltava": "Czech", "Tisza": "Ukraine",
        "Okavango": "Angola", "Magdalena": "Colombia", "Fraser": "Canada",
    },
    "discovery_year": {
        "hydrogen": "1766", "helium": "1868", "radium": "1898", "polonium": "1898",
        "uranium": "1789", "plutonium": "1940", "neon": "1898", "argon": "1894",
        "nitrogen": "1772", "chlorine": "1774", "phosphorus": "1669", "potassium": "1807",
        "sodium": "1807", "calcium": "1808", "iodine": "1811", "xenon": "1898",
        "krypton": "1898", "titanium": "1791", "tungsten": "1783", "nickel": "1751",
        "germanium": "1886", "gallium": "1875", "scandium": "1879", "technetium": "1937",
        "francium": "1939", "neptunium": "1940", "Pluto": "1930", "Neptune": "1846",
        "Uranus": "1781", "penicillin": "1928", "America": "1492", "the electron": "1897",
        "the neutron": "1932", "X-rays": "1895", "insulin": "1921", "radioactivity": "1896",
        "Ceres": "1801", "Tutankhamun's tomb": "1922",
        # second batch
        "the wreck of the Titanic": "1985", "the Rosetta Stone": "1799",
        "the Higgs boson": "2012", "the Terracotta Army": "1974", "the positron": "1932",
        "the structure of DNA": "1953", "Eris": "2005", "Charon": "1978",
    },
    "instrument": {
        "Yo-Yo Ma": "cello", "Lang Lang": "piano", "Itzhak Perlman": "violin",
        "Eric Clapton": "guitar", "Jimi Hendrix": "guitar", "Kenny G": "saxophone",
        "Ringo Starr": "drums", "Louis Armstrong": "trumpet", "Miles Davis": "trumpet",
        "John Coltrane": "saxophone", "Charlie Parker": "saxophone", "Elton John": "piano",
        "Billy Joel": "piano", "Carlos Santana": "guitar", "Slash": "guitar",
        "Joshua Bell": "violin", "Anne-Sophie Mutter": "violin", "Jacqueline du Pre": "cello",
        "Wynton Marsalis": "trumpet", "Dizzy Gillespie": "trumpet", "Travis Barker": "drums",
        "Flea": "bass", "Keith Moon": "drums", "John Bonham": "drums", "Neil Peart": "drums",
        "Buddy Rich": "drums", "Ravi Shankar": "sitar", "B.B. King": "guitar",
        "Stevie Ray Vaughan": "guitar", "Eddie Van Halen": "guitar", "Jimmy Page": "guitar",
        "Brian May": "guitar", "Glenn Gould": "piano", "Vladimir Horowitz": "piano",
        "Niccolo Paganini": "violin", "Pablo Casals": "cello", "Andres Segovia": "guitar",
        "Herbie Hancock": "piano", "Thelonious Monk": "piano", "Jaco Pastorius": "bass",
        "Benny Goodman": "clarinet", "Sonny Rollins": "saxophone",
        "Clarence Clemons": "saxophone", "James Galway": "flute", "Lindsey Stirling": "violin",
        # second batch
        "Kurt Cobain": "guitar", "Keith Richards": "guitar", "Chuck Berry": "guitar",
        "Angus Young": "guitar", "Duke Ellington": "piano", "Liberace": "piano",
        "Dave Brubeck": "piano", "Franz Liszt": "piano", "Frederic Chopin": "piano",
        "Lars Ulrich": "drums", "Mark Knopfler": "guitar", "David Gilmour": "guitar",
        "Sid Vicious": "bass", "Ginger Baker": "drums", "Charlie Watts": "drums",
        "Chet Baker": "trumpet", "Stan Getz": "saxophone", "Jascha Heifetz": "violin",
        "Mstislav Rostropovich": "cello", "Martha Argerich": "piano",
    },
    "employer": {
        "Tim Cook": "Apple", "Satya Nadella": "Microsoft", "Sundar Pichai": "Google",
        "Jensen Huang": "Nvidia", "Andy Jassy": "Amazon", "Warren Buffett": "Berkshire",
        "Jamie Dimon": "JPMorgan", "Mary Barra": "General Motors", "Lisa Su": "AMD",
        "Sam Altman": "OpenAI", "Demis Hassabis": "DeepMind", "Jim Farley": "Ford",
        "Shantanu Narayen": "Adobe", "Arvind Krishna": "IBM", "Ted Sarandos": "Netflix",
        "Brian Chesky": "Airbnb", "Dara Khosrowshahi": "Uber", "Marc Benioff": "Salesforce",
        "Larry Ellison": "Oracle", "Gwynne Shotwell": "SpaceX", "Craig Federighi": "Apple",
        "Brad Smith": "Microsoft", "Kevin Scott": "Microsoft", "Jeff Dean": "Google",
        "Jeff Bezos": "Amazon",
    },
    "author": {
        "Pride and Prejudice": "Austen", "War and Peace": "Tolstoy", "1984": "Orwell",
        "Don Quixote": "Cervantes", "Moby-Dick": "Melville", "The Great Gatsby": "Fitzgerald",
        "To Kill a Mockingbird": "Lee", "Jane Eyre": "Bronte", "Wuthering Heights": "Bronte",
        "Frankenstein": "Shelley", "Dracula": "Stoker", "Anna Karenina": "Tolstoy",
        "Great Expectations": "Dickens", "Oliver Twist": "Dickens",
        "A Tale of Two Cities": "Dickens", "The Catcher in the Rye": "Salinger",
        "Brave New World": "Huxley", "Ulysses": "Joyce", "Madame Bovary": "Flaubert",
        "Les Miserables": "Hugo", "The Hobbit": "Tolkien", "The Lord of the Rings": "Tolkien",
        "Animal Farm": "Orwell", "The Adventures of Tom Sawyer": "Twain",
        "Treasure Island": "Stevenson", "The Old Man and the Sea": "Hemingway",
        "One Hundred Years of Solitude": "Marquez", "Lolita": "Nabokov",
        "The Picture of Dorian Gray": "Wilde", "Robinson Crusoe": "Defoe",
        "Gulliver's Travels": "Swift", "Fahrenheit 451": "Bradbury",
        "The Grapes of Wrath": "Steinbeck", "Of Mice and Men": "Steinbeck", "Emma": "Austen",
        "The Da Vinci Code": "Brown", "The Count of Monte Cristo": "Dumas",
        "The Three Musketeers": "Dumas", "Heart of Darkness": "Conrad",
        "Mrs Dalloway": "Woolf", "The Time Machine": "Wells",
        "Around the World in Eighty Days": "Verne",
    },
    "mountain_range": {
        "Mount Everest": "Himalayas", "K2": "Karakoram", "Mont Blanc": "Alps",
        "the Matterhorn": "Alps", "Aconcagua": "Andes", "Kangchenjunga": "Himalayas",
        "Mount Elbrus": "Caucasus", "Denali": "Alaska Range", "Mount Whitney": "Sierra Nevada",
        "Pikes Peak": "Rocky", "Mount Elbert": "Rocky", "Ben Nevis": "Grampian",
        "Mount Mitchell": "Appalachian", "the Eiger": "Alps", "the Jungfrau": "Alps",
        "the Zugspitze": "Alps", "Mount Rainier": "Cascade", "Mount St. Helens": "Cascade",
        "Mount Hood": "Cascade", "Mount Shasta": "Cascade", "Annapurna": "Himalayas",
        "Nanga Parbat": "Himalayas", "Makalu": "Himalayas", "Lhotse": "Himalayas",
        "Chimborazo": "Andes", "Huascaran": "Andes", "Ojos del Salado": "Andes",
        "Mount Toubkal": "Atlas", "the Grossglockner": "Alps", "Aneto": "Pyrenees",
        "Monte Perdido": "Pyrenees", "Mount Narodnaya": "Ural", "Mount Robson": "Rocky",
    },
    "inventor": {
        "telephone": "Bell", "phonograph": "Edison", "printing press": "Gutenberg",
        "World Wide Web": "Berners-Lee", "dynamite": "Nobel", "airplane": "Wright",
        "cotton gin": "Whitney", "saxophone": "Sax", "lightning rod": "Franklin",
        "bifocals": "Franklin", "battery": "Volta", "cash register": "Ritty",
        "ballpoint pen": "Biro", "safety razor": "Gillette", "hot air balloon": "Montgolfier",
        "stethoscope": "Laennec", "mercury thermometer": "Fahrenheit", "barometer": "Torricelli",
        "pendulum clock": "Huygens", "computer mouse": "Engelbart",
        "C programming language": "Ritchie", "Python programming language": "Rossum",
        "Linux kernel": "Torvalds", "kaleidoscope": "Brewster", "seed drill": "Tull",
        "spinning jenny": "Hargreaves", "flying shuttle": "Kay", "safety elevator": "Otis",
        "AK-47": "Kalashnikov", "hovercraft": "Cockerell",
        # second batch
        "periodic table": "Mendeleev", "polio vaccine": "Salk", "gramophone": "Berliner",
        "dishwasher": "Cochrane", "smallpox vaccine": "Jenner", "Analytical Engine": "Babbage",
        "microwave oven": "Spencer", "Java programming language": "Gosling",
    },
}
# fmt: on


def candidates() -> list[dict]:
    """Every candidate fact, one record per (relation, subject), in table order."""
    spec = importlib.util.spec_from_file_location("known_prepare", HERE / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)  # data/known/prepare.py: CAPITALS
    spec.loader.exec_module(prepare)
    out = []
    for kind, table in RELATIONS.items():
        table = prepare.CAPITALS if table is None else table
        for entity, gold in table.items():
            out.append(
                {
                    "question": FRAMES[kind].format(e=entity),
                    "answer": gold,
                    "type": kind,
                    "entity": entity,
                }
            )
    assert len({c["question"] for c in out}) == len(out), "a candidate repeats"
    assert all(tasks.normalize_answer(c["answer"]) for c in out)
    return out


def label(net, tokenizer, facts: list[dict], batch_size: int, new_tokens: int) -> list[dict]:
    """Each fact with the base's zero-shot chat answer and whether it is right."""
    said = tasks.answer(net, tokenizer, [f["question"] for f in facts], new_tokens, batch_size)
    return [
        dict(f, base_answer=a, base_correct=tasks.fact_correct(a, f["answer"]))
        for f, a in zip(facts, said)
    ]


# -- the split: no model ---------------------------------------------------------------------------
def norm(text: str) -> str:
    return tasks.normalize_answer(text)


def old_side(fact: dict, mix: list[dict], evaluation: list[dict]) -> set:
    """The sides a candidate is bound to by the older split: 'protect' if it repeats a fact of
    known_mix (trained on), 'confirm' if one of known_eval (reported on). Repeats: the same answer
    and either the same relation or the same question or the subject named in the old question."""
    sides = set()
    for side, rows in (("protect", mix), ("confirm", evaluation)):
        for r in rows:
            if norm(r["answer"]) != norm(fact["answer"]):
                continue
            same = r["type"] == fact["type"] or r["question"] == fact["question"]
            if same or f" {norm(fact['entity'])} " in f" {norm(r['question'])} ":
                sides.add(side)
    return sides


def units(facts: list[dict]) -> list[list[int]]:
    """Indices joined when they share (relation, answer) or (subject, answer); in file order."""
    parent = list(range(len(facts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}
    for i, f in enumerate(facts):
        for key in (
            ("relation", f["type"], norm(f["answer"])),
            ("subject", norm(f["entity"]), norm(f["answer"])),
        ):
            j = first.setdefault(key, i)
            parent[root(i)] = root(j)
    groups = {}
    for i in range(len(facts)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split(facts: list[dict], mix: list[dict], evaluation: list[dict]):
    """(protect, confirm) in file order; see the module's docstring."""
    side = {}
    bound, free = [], []
    for unit in units(facts):
        sides = set().union(*(old_side(facts[i], mix, evaluation) for i in unit))
        assert len(sides) <= 1, f"bound to both halves: {[facts[i]['question'] for i in unit]}"
        (bound if sides else free).append((unit, sides))
    correct = {"protect": Counter(), "confirm": Counter()}
    free.sort(key=lambda u: sha(facts[u[0][0]]["question"]))
    for unit, sides in bound + free:
        if sides:
            pick = sides.pop()
        elif not any(facts[i]["base_correct"] for i in unit):
            pick = "protect"  # confirm would drop it; protect keeps it with the model's own answer
        else:
            load = {s: sum(correct[s][facts[i]["type"]] for i in unit) for s in correct}
            if load["protect"] == load["confirm"]:
                pick = ("protect", "confirm")[int(sha(facts[unit[0]]["question"]), 16) % 2]
            else:
                pick = min(load, key=load.get)
        for i in unit:
            side[i] = pick
            correct[pick][facts[i]["type"]] += facts[i]["base_correct"]
    protect = [f for i, f in enumerate(facts) if side[i] == "protect"]
    confirm = [f for i, f in enumerate(facts) if side[i] == "confirm" and f["base_correct"]]
    return protect, confirm


def frame(question: str) -> str:
    """The frame a question is asked in: the first of FRAMES it fills, else the question itself."""
    for f in FRAMES.values():
        head, tail = f.split("{e}")
        if question.startswith(head) and question.endswith(tail) and len(question) > len(f) - 3:
            return f
    return question


def write_split(path: Path):
    facts = tasks.read_jsonl(path)
    facts = [{k: v for k, v in f.items() if k != "_line"} for f in facts]
    old = {s: tasks.read_jsonl(path.parent / f"known_{s}.jsonl") for s in ("mix", "eval")}
    protect, confirm = split(facts, old["mix"], old["eval"])
    # the properties the README promises, checked on what is written
    assert not {r["question"] for r in protect} & {r["question"] for r in confirm}
    pairs = [
        {(frame(r["question"]), norm(r["answer"])) for r in rows} for rows in (protect, confirm)
    ]
    assert not pairs[0] & pairs[1], pairs[0] & pairs[1]
    assert all(r["base_correct"] for r in confirm)
    keep = [r for r in protect if r["base_correct"]]  # mixed in with their gold: what the base says
    splits = {"known_protect": protect, "known_confirm": confirm, "known_keep": keep}
    for name, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        tasks.atomic_write_text(path.parent / f"{name}.jsonl", text)
        right = sum(r["base_correct"] for r in rows)
        print(f"{name}.jsonl: {len(rows)} facts, {right} base-correct")
    print(f"{'relation':15} {'candidates':>10} {'correct':>8} {'protect':>8} {'confirm':>8}")
    for kind in FRAMES:
        n = [sum(r["type"] == kind for r in rows) for rows in (facts, protect, confirm)]
        ok = sum(r["type"] == kind and r["base_correct"] for r in facts)
        ok_p = sum(r["type"] == kind and r["base_correct"] for r in protect)
        print(f"{kind:15} {n[0]:>10} {ok:>8} {n[1]:>4} ({ok_p:>2}) {n[2]:>8}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="smollm2_135m", help="checkpoint folder or name")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts answered at once")
    parser.add_argument("--new-tokens", type=int, default=16, help="as evaluate.py's fact_tokens")
    parser.add_argument("--out", default=str(HERE / "known_relations.jsonl"), help="labelled")
    parser.add_argument(
        "--split-only",
        action="store_true",
        help="no model: rewrite known_protect, known_confirm and known_keep.jsonl beside --out",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.split_only:
        import checkpoints
        import model

        net, tokenizer = model.load(args.ckpt)
        identity = checkpoints.identity(checkpoints.resolve(args.ckpt))
        facts = candidates()
        start = time.perf_counter()
        labelled = label(net, tokenizer, facts, args.batch_size, args.new_tokens)
        seconds = time.perf_counter() - start
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in labelled)
        tasks.atomic_write_text(out, text)
        print(
            f"{out}: {len(labelled)} candidates, {sum(r['base_correct'] for r in labelled)} "
            f"base-correct, labelled in {seconds:.0f} s; checkpoint {identity}"
        )
    write_split(out)


if __name__ == "__main__":
    main()
